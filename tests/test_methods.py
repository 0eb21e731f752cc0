"""The readings of CLIP-PING beside the default, the peers and A-CLIP-PING: each term against an
independent computation on fixed tensors, and each setting training a few steps."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, crash_and_resume

from clip_ping.model.losses import ClipPingLoss, info_nce
from clip_ping.model.student import embed_dim
from clip_ping.training.checkpoints import load_checkpoint
from clip_ping.training.trainer import TrainConfig, Trainer


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
    u, v = _unit(8, embed_dim(trainer.model), seed=4), _unit(8, embed_dim(trainer.model), seed=5)
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


# --------------------------------------------------------------------------- peers: their terms


def test_one_way_nce_is_the_image_to_text_cross_entropy():
    from clip_ping.model.losses import one_way_nce

    x, y = _unit(5, 8, seed=6), _unit(5, 8, seed=7)
    expected = sum(-math.log(math.exp(4 * float(x[i] @ y[i])) / sum(math.exp(4 * float(x[i] @ y[j])) for j in range(5)))
                   for i in range(5)) / 5
    assert float(one_way_nce(x, y, torch.tensor(4.0))) == pytest.approx(expected, rel=1e-5)


def test_nt_xent_matches_simclr_written_out():
    from clip_ping.model.losses import nt_xent

    z1, z2 = torch.randn(4, 6, generator=torch.Generator().manual_seed(8)), torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    views = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(8):
        partner = (i + 4) % 8
        sims = [math.exp(float(views[i] @ views[k]) / 0.5) for k in range(8) if k != i]
        total += -math.log(math.exp(float(views[i] @ views[partner]) / 0.5) / sum(sims))
    assert float(nt_xent(z1, z2, 0.5)) == pytest.approx(total / 8, rel=1e-5)


def test_relational_kl_matches_the_kl_of_off_diagonal_softmaxes():
    from clip_ping.model.losses import relational_kl

    s, t = _unit(4, 8, seed=10), _unit(4, 5, seed=11)
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        zs = sum(math.exp(float(s[i] @ s[j]) / 0.2) for j in others)
        zt = sum(math.exp(float(t[i] @ t[j]) / 0.2) for j in others)
        for j in others:
            pt, ps = math.exp(float(t[i] @ t[j]) / 0.2) / zt, math.exp(float(s[i] @ s[j]) / 0.2) / zs
            total += pt * math.log(pt / ps)
    assert float(relational_kl(s, t, 0.2)) == pytest.approx(total / 4, rel=1e-5)
    assert float(relational_kl(t, t, 0.2)) == pytest.approx(0.0, abs=1e-6)


def test_declip_queue_offers_the_nearest_text_of_another_sample():
    from clip_ping.objectives.declip import TextQueue

    queue = TextQueue(size=3, dim=2)
    queue.push(torch.tensor([1, 2]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    v = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    nearest = queue.nearest(torch.tensor([5, 1, 6]), v)
    # row 0 finds sample 1's text; row 1 is sample 1 itself, so it gets sample 2's; row 2 finds sample 2's
    assert nearest.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    queue.push(torch.tensor([7, 8]), torch.tensor([[0.6, 0.8], [0.8, 0.6]]))  # FIFO: sample 1 is overwritten
    assert sorted(queue.indices.tolist()) == [2, 7, 8]


def test_declip_nns_contrasts_images_with_the_queued_nearest_texts():
    from clip_ping.model.losses import one_way_nce
    from clip_ping.objectives import DeclipNnsObjective, StepContext

    objective = DeclipNnsObjective(queue_size=8, embed_dim=4, weight=0.25)
    u, v = _unit(3, 4, seed=12), _unit(3, 4, seed=13)
    ctx = StepContext(step=0, logit_scale=torch.tensor(10.0))
    first = objective.loss(u, v, {"index": torch.tensor([0, 1, 2])}, ctx)
    assert "loss_nns" not in first  # nothing queued yet
    objective.after_step({"index": torch.tensor([0, 1, 2])})
    u2, v2 = _unit(3, 4, seed=14), _unit(3, 4, seed=15)
    out = objective.loss(u2, v2, {"index": torch.tensor([3, 4, 5])}, ctx)
    nearest = v[(v2 @ v.T).argmax(dim=1)]
    assert torch.allclose(out["loss_nns"], one_way_nce(u2, nearest, torch.tensor(10.0)))
    assert torch.allclose(out["loss"], out["loss_clip"] + 0.25 * out["loss_nns"])


def test_slip_loader_adds_two_seeded_views_and_leaves_the_clip_view_unchanged(tiny_synth, tmp_path):
    clip = Trainer(_cfg(tiny_synth, tmp_path / "clip", method="clip"))
    slip = Trainer(_cfg(tiny_synth, tmp_path / "slip", method="slip"))
    plain = next(iter(clip._loader(epoch=0, start_batch=0)))
    batch = next(iter(slip._loader(epoch=0, start_batch=0)))
    again = next(iter(slip._loader(epoch=0, start_batch=0)))
    assert torch.equal(plain["image"], batch["image"])
    assert batch["image_views"].shape == (8, 2, *batch["image"].shape[1:])
    assert torch.equal(batch["image_views"], again["image_views"])  # the same views after a restart
    assert not torch.equal(batch["image_views"][:, 0], batch["image_views"][:, 1])
    u, v, *views = slip._encode_all(batch["image"], batch["text"], batch["image_views"])
    out = slip._loss(u, v, batch, views=tuple(views))
    assert set(out) == {"loss", "loss_clip", "loss_ssl"} and torch.isfinite(out["loss"])
    with torch.no_grad():
        direct = slip.model.encode_image(batch["image_views"][:, 1], normalize=True)
    assert torch.allclose(views[1], direct, atol=1e-5)


# --------------------------------------------------------------------------- peers: train, resume


PEERS = {
    "declip-nns": dict(method="declip-nns", queue_size=16),
    "slip": dict(method="slip"),
    "relational": dict(method="relational"),
}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_each_peer_trains(tiny_banked, tmp_path, name):
    summary = Trainer(_cfg(tiny_banked, tmp_path / name, **PEERS[name])).fit()
    assert summary["step"] == 3
    records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    extra = {"declip-nns": "loss_nns", "slip": "loss_ssl", "relational": "loss_relational"}[name]
    assert extra in records[-1]


def test_declip_queue_resumes_exactly(tiny_banked, tmp_path):
    a, b = crash_and_resume(lambda out, **kw: _cfg(tiny_banked, out, steps=4, save_every=2, method="declip-nns",
                                                   queue_size=12, **kw), tmp_path, crash_step=3)
    assert (a["objective"]["_extra_state"]["queue"]["indices"] >= 0).all()
    assert_same_weights_and_state(a, b)


# --------------------------------------------------------------------------- A-CLIP-PING


def test_teacher_input_undoes_the_student_normalisation_and_applies_the_teacher_one():
    from clip_ping.objectives.views import ImageGeometry, to_teacher_input

    student = ImageGeometry((4, 4), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    teacher = ImageGeometry((8, 8), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    pixels = torch.tensor([0.6, 0.2, 0.9]).view(1, 3, 1, 1).expand(2, 3, 4, 4)  # one colour per channel
    student_view = (pixels - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    out = to_teacher_input(student_view, student, teacher)
    expected = (torch.tensor([0.6, 0.2, 0.9]) - torch.tensor(teacher.mean)) / torch.tensor(teacher.std)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_the_teacher_sees_each_neighbour_in_the_view_the_student_gets_of_it_this_epoch(tiny_banked, tmp_path):
    from clip_ping.data.order import SeededAugmentation

    trainer = Trainer(_cfg(tiny_banked, tmp_path / "run", method="a-clip-ping", steps=12))
    trainer.step = 7  # epoch 1 of 6 batches
    batch = next(iter(trainer._loader(epoch=1, start_batch=1)))
    prepared = batch["prepared"]
    assert prepared["step"] == 7 and prepared["ok_p"].all()
    p, q = trainer.objective.source.pick(batch["index"], 7)
    assert torch.equal(prepared["p"], p) and torch.equal(prepared["q"], q)
    # the loader's own view of sample p_0 in epoch 1 (as when p_0 is a batch row, whose pixels collate finishes)
    student_view = SeededAugmentation(trainer._loader(1, 0).dataset.dataset, trainer.cfg.seed)[(int(p[0]), 1, None)]
    assert torch.equal(prepared["views_p"][0], trainer.finish_images(student_view["image"][None])[0])
    assert prepared["captions_q"][3] == trainer.table.captions[int(q[3])]


def test_a_clip_ping_targets_are_the_online_teacher_features_of_the_neighbours(tiny_banked, tmp_path):
    from clip_ping.teachers import load_image_teacher, load_text_teacher

    trainer = Trainer(_cfg(tiny_banked, tmp_path / "run", method="a-clip-ping"))
    batch = next(iter(trainer._loader(epoch=0, start_batch=0)))
    u, v = _unit(8, embed_dim(trainer.model), seed=16), _unit(8, embed_dim(trainer.model), seed=17)
    out = trainer._loss(u, v, batch)
    # independently: the tiny teachers at their 40 px on the neighbours' views, through the same heads
    image_teacher, text_teacher = load_image_teacher("test-tiny-image"), load_text_teacher("test-tiny-text")
    prepared = batch["prepared"]

    def image_features(views):
        pixels = views * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) \
            + torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        x = F.interpolate(pixels.clamp(0, 1), size=(40, 40), mode="bilinear", antialias=True)
        return F.normalize(image_teacher.encode((x - 0.5) / 0.25), dim=1)

    a_p, a_q = image_features(prepared["views_p"]), image_features(prepared["views_q"])
    b_p = F.normalize(text_teacher.encode(prepared["captions_p"]), dim=1)
    b_q = F.normalize(text_teacher.encode(prepared["captions_q"]), dim=1)
    heads, scale = trainer.objective.heads, trainer.model.logit_scale.exp()
    nn = (info_nce(u, heads.project_image(a_p), scale) + info_nce(v, heads.project_text(b_q), scale)) / 2
    xnn = (info_nce(u, heads.project_text(b_p), scale) + info_nce(v, heads.project_image(a_q), scale)) / 2
    assert torch.allclose(out["loss_nn"], nn, atol=1e-5) and torch.allclose(out["loss_xnn"], xnn, atol=1e-5)
    # the bank rows would give other targets: the online teacher is what is used
    assert not torch.allclose(out["loss_nn"], Trainer(_cfg(tiny_banked, tmp_path / "b"))._loss(u, v, batch)["loss_nn"])


def test_online_feature_queue_finds_the_most_similar_other_sample_and_returns_its_stored_features():
    from clip_ping.objectives.active import OnlineFeatureQueue

    queue = OnlineFeatureQueue(size=4, image_dim=2, text_dim=2)
    queue.push(torch.tensor([10, 11]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    a = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    b = torch.tensor([[0.2, 0.8], [0.3, 0.7]])
    p, q, (a_p, b_p, a_q, b_q) = queue.nearest_features(torch.tensor([11, 12]), a, b)
    # row 0 (sample 11): image nearest sample 10; text nearest sample 10 ([0, 1]).
    # row 1 (sample 12): image nearest is sample 11 ([0, 1]); text nearest is sample 10
    assert p.tolist() == [10, 11] and q.tolist() == [10, 10]
    assert torch.equal(a_p[1], torch.tensor([0.0, 1.0])) and torch.equal(b_p[1], torch.tensor([1.0, 0.0]))
    assert torch.equal(b_q[0], torch.tensor([0.0, 1.0])) and torch.equal(a_q[0], torch.tensor([1.0, 0.0]))


ACTIVE = {"dataset": dict(method="a-clip-ping"), "queue": dict(method="a-clip-ping", neighbor_source="queue", queue_size=12)}


@pytest.mark.parametrize("reading", sorted(ACTIVE))
def test_a_clip_ping_resumes_exactly(tiny_banked, tmp_path, reading):
    a, b = crash_and_resume(lambda out, **kw: _cfg(tiny_banked, out, steps=4, save_every=2, **ACTIVE[reading], **kw),
                            tmp_path, crash_step=3)
    assert "loss_nn" in (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert_same_weights_and_state(a, b)


def test_a_clip_ping_trains_with_the_default_teachers(tiny_synth, tmp_path):
    """The shipped EfficientNet-Lite0 and MiniLM teachers, online, on a bank of their dims."""
    import shutil

    from conftest import write_random_bank

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    write_random_bank(data, dims=(1280, 384), teachers=("efficientnet-lite0", "all-minilm-l6-v2"))
    summary = Trainer(_cfg(data, tmp_path / "run", method="a-clip-ping", steps=1, teacher_image_size=96)).fit()
    assert summary["step"] == 1
    assert "loss_xnn" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_the_online_teacher_runs_at_the_banks_resolution_unless_asked_otherwise(tiny_banked, tmp_path, caplog):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_banked, data)
    manifest = json.loads((data / "banks" / "manifest.json").read_text())
    manifest["teacher_image_size"] = 32  # as written by extract --teacher-image-size 32
    (data / "banks" / "manifest.json").write_text(json.dumps(manifest))

    default = Trainer(_cfg(data, tmp_path / "a", method="a-clip-ping"))
    assert default.objective.teachers.geometry.size == (32, 32)
    assert "another resolution" not in caplog.text
    asked = Trainer(_cfg(data, tmp_path / "b", method="a-clip-ping", teacher_image_size=48))
    assert asked.objective.teachers.geometry.size == (48, 48)
    assert "another resolution than the bank's (32)" in caplog.text
    # a bank at the teacher's own size leaves the teacher at its own 40 px
    assert Trainer(_cfg(tiny_banked, tmp_path / "c", method="a-clip-ping")).objective.teachers.geometry.size == (40, 40)
