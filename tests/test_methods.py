"""The readings of CLIP-PING beside the default, the peers and A-CLIP-PING: each term against an
independent computation on fixed tensors, and each setting training a few steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_ping.checkpoints import load_checkpoint
from clip_ping.losses import ClipPingLoss, info_nce
from clip_ping.trainer import TrainConfig, Trainer
from conftest import TINY_MODEL


@pytest.fixture(autouse=True)
def _tiny_student(tiny_model):
    """Every run here trains the tiny registered student: the methods, not the model, are under test."""

def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), method="clip-ping", model=TINY_MODEL, batch_size=8, steps=3, warmup_steps=1, workers=0,
                log_every=1, save_every=100, progress=False, tensorboard=False, neighbor_topk=3)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- colliding targets


def _collision_loss_by_loops(x, y, scale, own, of, rule):
    """Each direction row by row: which columns are the same sample's target as the row's, or the row's own sample."""
    n = len(x)

    def direction(rows, cols, related):
        total = 0.0
        for r in range(n):
            logits = [scale * float(rows[r] @ cols[c]) for c in range(n)]
            if rule == "mask":
                kept = [c for c in range(n) if c == r or not related(r, c)]
                log_z = math.log(sum(math.exp(logits[c]) for c in kept))
                total += log_z - logits[r]
            else:
                log_z = math.log(sum(math.exp(v) for v in logits))
                pos = [c for c in range(n) if related(r, c)]
                total += sum(log_z - logits[c] for c in pos) / len(pos)
        return total / n

    xy = direction(x, y, lambda r, c: of[r] == of[c] or own[r] == of[c])
    yx = direction(y, x, lambda r, c: of[r] == of[c] or of[r] == own[c])
    return (xy + yx) / 2


@pytest.mark.parametrize("rule", ["mask", "positives"])
def test_colliding_targets_match_a_row_by_row_computation(rule):
    x, y = _unit(6, 8, seed=0), _unit(6, 8, seed=1)
    own = torch.tensor([10, 11, 12, 13, 14, 15])
    of = torch.tensor([20, 20, 10, 21, 22, 23])  # rows 0 and 1 share a neighbour; row 2's neighbour is row 0
    got = info_nce(x, y, torch.tensor(5.0), duplicates=rule, collisions=(own, of))
    assert float(got) == pytest.approx(_collision_loss_by_loops(x, y, 5.0, own.tolist(), of.tolist(), rule), rel=1e-5)
    # without any collision the rules change nothing
    distinct = torch.tensor([30, 31, 32, 33, 34, 35])
    plain = info_nce(x, y, torch.tensor(5.0))
    assert torch.allclose(info_nce(x, y, torch.tensor(5.0), duplicates=rule, collisions=(own, distinct)), plain)
    assert not torch.allclose(got, plain)


def test_clip_ping_loss_applies_the_collision_rule_to_every_neighbour_term_only():
    u, v = _unit(5, 8, seed=2), _unit(5, 8, seed=3)
    t = {k: _unit(5, 8, seed=10 + i) for i, k in enumerate(["nn_image", "nn_text", "xnn_image", "xnn_text"])}
    index = torch.arange(5)
    p, q = torch.tensor([7, 7, 0, 8, 9]), torch.tensor([1, 6, 6, 2, 5])
    ids = {"nn_image": p, "xnn_image": p, "nn_text": q, "xnn_text": q}
    scale = torch.tensor(10.0)
    out = ClipPingLoss(0.5, 0.5, collisions="mask")(u, v, scale, t, index=index, target_ids=ids)
    masked = lambda x, key: info_nce(x, t[key], scale, duplicates="mask", collisions=(index, ids[key]))  # noqa: E731
    assert torch.allclose(out["loss_clip"], info_nce(u, v, scale))
    assert torch.allclose(out["loss_nn"], (masked(u, "nn_image") + masked(v, "nn_text")) / 2)
    assert torch.allclose(out["loss_xnn"], (masked(u, "xnn_image") + masked(v, "xnn_text")) / 2)
    leave = ClipPingLoss(0.5, 0.5)(u, v, scale, t)
    assert out["loss_nn"] < leave["loss_nn"]


# --------------------------------------------------------------------------- XNN pairing, student table


def test_xnn_through_the_other_modality_pulls_images_to_captions_of_q_and_captions_to_images_of_p(tiny_banked, tmp_path):
    trainer = Trainer(_cfg(tiny_banked, tmp_path / "run", xnn_pairing="other", lambda_nn=0.0))
    batch = next(iter(trainer._loader(epoch=0, start_batch=0)))
    u, v = _unit(8, trainer._embed_dim(), seed=4), _unit(8, trainer._embed_dim(), seed=5)
    out = trainer._loss(u, v, batch)
    objective = trainer.objective
    p, q = objective.source.pick(batch["index"], 0)
    a_p, _ = objective.banks.gather(p)
    _, b_q = objective.banks.gather(q)
    heads, scale = objective.heads, trainer.model.logit_scale.exp()
    expected = (info_nce(u, heads.project_text(b_q), scale) + info_nce(v, heads.project_image(a_p), scale)) / 2
    assert torch.allclose(out["loss_xnn"], expected)


def test_student_table_targets_use_stored_embeddings_and_the_teacher_target_for_unseen_rows():
    from clip_ping.objectives.targets import StudentTableTargets

    class Teacher:
        def __call__(self, index, u, v, p, q, rows=None):
            return {k: torch.full((len(index), 3), -1.0) for k in ("nn_image", "xnn_image", "nn_text", "xnn_text")}

    table = StudentTableTargets(n_samples=6, embed_dim=3, teacher=Teacher())
    table.write(torch.tensor([3]), torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]]))  # an earlier step
    u, v = torch.eye(3)[[2, 2]], torch.eye(3)[[0, 0]]
    out = table(torch.tensor([4, 5]), u, v, p=torch.tensor([3, 0]), q=torch.tensor([5, 1]))
    assert torch.equal(out["nn_image"][0], torch.tensor([1.0, 0, 0]))   # u of sample 3, stored earlier
    assert torch.equal(out["xnn_image"][0], torch.tensor([0, 1.0, 0]))  # v of sample 3
    assert torch.equal(out["nn_image"][1], torch.full((3,), -1.0))      # sample 0 never seen: teacher target
    assert torch.equal(out["nn_text"][0], v[1]) and torch.equal(out["xnn_text"][0], u[1])  # in this batch
    assert torch.equal(out["nn_text"][1], torch.full((3,), -1.0))
    assert table.seen.tolist() == [False, False, False, True, True, True]


# --------------------------------------------------------------------------- every setting trains


READINGS = {
    "xnn-other": dict(xnn_pairing="other"),
    "student-table": dict(targets="student_table"),
    "collisions-mask": dict(collisions="mask"),
    "collisions-positives": dict(collisions="positives"),
}


@pytest.mark.parametrize("name", sorted(READINGS))
def test_each_reading_trains(tiny_banked, tmp_path, name):
    summary = Trainer(_cfg(tiny_banked, tmp_path / name, **READINGS[name])).fit()
    assert summary["step"] == 3
    state = load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def crash_and_resume(cfg_of, tmp_path, crash_step=2):
    """Run straight; run again crashing before ``crash_step`` (after a checkpoint) and resume;
    return both final checkpoints."""
    Trainer(cfg_of(tmp_path / "straight")).fit()
    crashing = Trainer(cfg_of(tmp_path / "resumed"))
    real_step = crashing.train_step

    def crash(batch):
        if crashing.step == crash_step:
            raise KeyboardInterrupt  # stands in for a kill after the checkpoint of step crash_step
        return real_step(batch)

    crashing.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    Trainer(cfg_of(tmp_path / "resumed", resume="latest")).fit()
    return (load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt"),
            load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt"))


def assert_same_weights_and_state(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, t in a["objective"].items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b["objective"][key]), key
    extra_a, extra_b = a["objective"].get("_extra_state"), b["objective"].get("_extra_state")
    assert _flat(extra_a) == _flat(extra_b)


def _flat(state):
    """Nested state as comparable bytes (tensors by value)."""
    if isinstance(state, torch.Tensor):
        return ("tensor", tuple(state.shape), state.numpy().tobytes())
    if isinstance(state, dict):
        return tuple((k, _flat(v)) for k, v in sorted(state.items()))
    if isinstance(state, (list, tuple)):
        return tuple(_flat(v) for v in state)
    return state


def test_student_table_resumes_exactly(tiny_banked, tmp_path):
    a, b = crash_and_resume(lambda out, **kw: _cfg(tiny_banked, out, steps=4, save_every=2, targets="student_table", **kw),
                            tmp_path, crash_step=3)
    assert a["objective"]["_extra_state"]["targets"]["seen"].any()
    assert_same_weights_and_state(a, b)
