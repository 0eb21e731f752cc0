"""Every new term on two gloo processes equals one process (to 1e-5): loss, terms and gradients."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_CONFIG, TINY_MODEL
from test_distributed import _free_port

from clip_ping.training.trainer import TrainConfig, Trainer

SETTINGS = {
    "queue": dict(neighbor_source="queue", queue_size=16),
    "collisions-positives-xnn-other": dict(collisions="positives", xnn_pairing="other"),
    "collisions-mask-local": dict(collisions="mask", local_loss=True),
    "student-table": dict(targets="student_table"),
    "declip-nns": dict(method="declip-nns", queue_size=16),
    "slip": dict(method="slip"),
    "relational": dict(method="relational"),
    "a-clip-ping": dict(method="a-clip-ping"),
    "a-clip-ping-queue": dict(method="a-clip-ping", neighbor_source="queue", queue_size=16),
}


def _config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), method="clip-ping", model=TINY_MODEL, batch_size=8, steps=2,
                warmup_steps=0, workers=0, progress=False, tensorboard=False, grad_clip=None, neighbor_topk=3)
    base.update(kw)
    return TrainConfig(**base)


def _two_steps(cfg: TrainConfig) -> dict:
    """Loss, terms and gradients of the second step (the first fills queues and tables)."""
    trainer = Trainer(cfg)
    trainer.optimizer.step = lambda: None  # keep the weights, and this step's gradients
    batches = iter(trainer._loader(epoch=0, start_batch=0))
    trainer.train_step(next(batches))
    result = trainer.train_step(next(batches))
    params = dict(trainer.model.named_parameters()) | {f"objective.{n}": p for n, p in trainer.objective.named_parameters()}
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    return {"loss": result.loss, "terms": result.terms, "grads": grads}


def _worker(rank: int, world: int, port: int, model_dir: str, configs: dict, out_dir: str) -> None:
    import open_clip

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    open_clip.add_model_config(model_dir)
    results = {name: _two_steps(cfg) for name, cfg in configs.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_for_every_new_term(tiny_banked, tiny_model, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    single = {name: _two_steps(_config(tiny_banked, tmp_path / f"single-{name}", **kw)) for name, kw in SETTINGS.items()}
    configs = {name: _config(tiny_banked, tmp_path / f"multi-{name}", **kw) for name, kw in SETTINGS.items()}
    mp.start_processes(_worker, args=(2, _free_port(), str(model_dir), configs, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"rank{rank}.pt")
        for name, one in single.items():
            two = multi[name]
            assert abs(two["loss"] - one["loss"]) < 1e-5, name
            for term, value in one["terms"].items():
                assert two["terms"][term] == pytest.approx(value, abs=1e-5), (name, term)
            assert two["grads"].keys() == one["grads"].keys(), name
            for key, g in one["grads"].items():
                assert torch.allclose(two["grads"][key], g, atol=1e-5), (name, key)
