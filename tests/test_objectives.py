"""The objective layer: every method is an `Objective` the trainer drives through one interface."""

import pytest
import torch

from clip_ping.model.student import embed_dim
from clip_ping.objectives import OBJECTIVES, ClipObjective, Objective, StepContext
from clip_ping.objectives.sources import DatasetNeighbors
from clip_ping.training.checkpoints import objective_state_of_v1
from clip_ping.training.trainer import TrainConfig, Trainer


def test_every_method_choice_is_a_registered_objective():
    from clip_ping.config import from_dict

    assert set(OBJECTIVES) >= {"clip", "clip-ping"}
    for name in OBJECTIVES:
        assert from_dict(TrainConfig, {"method": name}).method == name


def test_plain_clip_objective_is_the_symmetric_infonce_with_its_terms_logged():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    v = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    out = ClipObjective().loss(u, v, {"index": torch.arange(6)}, StepContext(step=0, logit_scale=torch.tensor(10.0)))
    logits = 10.0 * u @ v.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(6))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(out["loss"], expected) and set(out) == {"loss", "loss_clip"}


def test_grad_share_scales_the_gradient_but_not_the_value():
    s = torch.tensor(3.0, requires_grad=True)
    shared = StepContext(step=0, logit_scale=s, grad_share=0.25).share(s * 2)
    shared.backward()
    assert float(shared.detach()) == 6.0 and float(s.grad) == pytest.approx(0.5)


def test_dataset_neighbours_draw_the_same_neighbours_for_the_same_step():
    class Table:
        k = 3

        def pick(self, index, top_k, generator):
            return torch.randint(0, 100, (len(index),), generator=generator), index

    source = DatasetNeighbors(Table(), top_k=3, seed=5)
    index = torch.arange(8)
    assert torch.equal(source.pick(index, 7)[0], source.pick(index, 7)[0])
    assert not torch.equal(source.pick(index, 7)[0], source.pick(index, 8)[0])


def test_the_trainer_holds_no_method_state(tiny_synth, tmp_path):
    cfg = TrainConfig(data=str(tiny_synth), out=str(tmp_path / "run"), method="clip", batch_size=8, steps=1,
                      workers=0, progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    assert isinstance(trainer.objective, Objective)
    assert not any(hasattr(trainer, name) for name in ("banks", "neighbors", "queue", "guidance", "student_memory"))


def test_a_checkpoint_of_another_method_is_refused_with_the_setting_named(tiny_synth, tmp_path):
    from clip_ping.errors import ConfigError

    cfg = dict(data=str(tiny_synth), out=str(tmp_path / "run"), batch_size=8, steps=1, workers=0, progress=False,
               tensorboard=False)
    trainer = Trainer(TrainConfig(method="clip", **cfg))
    state = trainer.state_dict()
    state["method"] = "clip-ping"
    with pytest.raises(ConfigError, match="--method clip-ping.*--method clip"):
        trainer.load_state_dict(state)


def test_checkpoints_written_before_objectives_map_onto_the_heads():
    weight = torch.ones(2, 3)
    state = {"guidance": {"image_head.weight": weight}, "queue": {"ptr": 1}, "student_memory": None}
    converted = objective_state_of_v1(state)
    assert converted["heads.image_head.weight"] is weight
    assert converted["_extra_state"] == {"source": {"ptr": 1}, "targets": None}
    assert objective_state_of_v1({"guidance": None}) == {}


def _banked_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), method="clip-ping", batch_size=8, steps=5, warmup_steps=1, workers=0,
                log_every=1, save_every=100, progress=False, tensorboard=False, neighbor_topk=3)
    base.update(kw)
    return TrainConfig(**base)


def test_rows_prepared_in_the_loader_give_the_loss_of_rows_read_in_the_step(tiny_banked, tmp_path):
    trainer = Trainer(_banked_cfg(tiny_banked, tmp_path / "run"))
    trainer.step = 4  # a step whose top-3 draw is not the first neighbour
    batch = next(iter(trainer._loader(epoch=0, start_batch=0)))
    assert batch["prepared"]["step"] == 4 and torch.equal(batch["prepared"]["index"], batch["index"])
    u, v = trainer._encode(batch["image"], batch["text"])
    with_prepared = trainer._loss(u, v, batch)
    inline = trainer._loss(u, v, {k: t for k, t in batch.items() if k != "prepared"})
    for key in ("loss", "loss_nn", "loss_xnn"):
        assert torch.equal(with_prepared[key], inline[key]), key


def test_loader_workers_preparing_neighbour_rows_train_the_same_weights(tiny_banked, tmp_path):
    from clip_ping.training.checkpoints import load_checkpoint

    Trainer(_banked_cfg(tiny_banked, tmp_path / "main", workers=0)).fit()
    Trainer(_banked_cfg(tiny_banked, tmp_path / "workers", workers=2)).fit()
    a = load_checkpoint(tmp_path / "main" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "workers" / "checkpoints" / "latest.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, t in a["objective"].items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b["objective"][key]), key


TRAIN_SCRIPT = """
import sys
from clip_ping.training.trainer import TrainConfig, Trainer
Trainer(TrainConfig(**{cfg!r})).fit()
"""


def test_kill_9_mid_run_then_resume_gives_the_weights_of_an_unbroken_run(tiny_banked, tmp_path):
    """CLIP-PING with loader workers preparing neighbour rows: SIGKILL to the whole process group after a
    checkpoint, resume, and every tensor of model and heads equals the uninterrupted run's."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from clip_ping.training.checkpoints import load_checkpoint

    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")  # both runs in the same kind of process
    kw = dict(steps=10, save_every=2, workers=2)
    straight = tmp_path / "straight.py"
    straight.write_text(TRAIN_SCRIPT.format(cfg=dataclasses.asdict(_banked_cfg(tiny_banked, tmp_path / "straight", **kw))))
    subprocess.run([sys.executable, str(straight)], env=env, check=True, stdout=subprocess.DEVNULL)
    cfg = _banked_cfg(tiny_banked, tmp_path / "killed", **kw)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(cfg=dataclasses.asdict(cfg)))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "killed" / "checkpoints" / "step_0000004.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, mid-run
        proc.wait()
    killed_at = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")["step"]
    assert 2 <= killed_at < 10  # latest.pt is written after the step file: either may be the newest
    resume = tmp_path / "resume.py"
    resume.write_text(TRAIN_SCRIPT.format(cfg=dataclasses.asdict(dataclasses.replace(cfg, resume="latest"))))
    subprocess.run([sys.executable, str(resume)], env=env, check=True, stdout=subprocess.DEVNULL)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 10
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, t in a["objective"].items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, b["objective"][key]), key


@pytest.fixture(scope="module")
def repeated_captions(tiny_synth, tmp_path_factory):
    """The tiny data set with every caption used by several rows, and a random bank for it."""
    import csv
    import shutil

    from conftest import write_random_bank

    data = tmp_path_factory.mktemp("repeated") / "data"
    shutil.copytree(tiny_synth, data)
    with open(data / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    for i, row in enumerate(rows[1:]):
        row[1] = f"caption number {i % 5}"
    with open(data / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    write_random_bank(data)
    return data


@pytest.mark.parametrize("method", ["clip", "clip-ping"])
def test_duplicate_caption_rules_change_the_loss_of_a_batch_with_duplicates(repeated_captions, tmp_path, method):
    losses = {}
    for rule in ("none", "mask", "positives"):
        trainer = Trainer(_banked_cfg(repeated_captions, tmp_path / rule, method=method, duplicate_captions=rule))
        batch = next(iter(trainer._loader(epoch=0, start_batch=0)))
        captions = [trainer.table.captions[i] for i in batch["index"].tolist()]
        assert len(set(captions)) < len(captions)
        # embeddings that differ row by row (an untrained tiny student gives nearly equal ones)
        g = torch.Generator().manual_seed(0)
        u, v = (torch.nn.functional.normalize(torch.randn(len(captions), embed_dim(trainer.model), generator=g), dim=1)
                for _ in range(2))
        losses[rule] = float(trainer._loss(u, v, batch)["loss_clip"])
    # masking removes negatives that are really the same caption; counting them as positives changes the target
    assert losses["mask"] < losses["none"] and losses["positives"] != losses["none"]
