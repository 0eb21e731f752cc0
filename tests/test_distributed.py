"""Two gloo processes on one global batch give the loss and gradients of one process."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clip_ping.trainer import TrainConfig, Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), method="clip", batch_size=8, steps=1, warmup_steps=0, workers=0,
                progress=False, tensorboard=False, grad_clip=None)
    base.update(kw)
    return TrainConfig(**base)


def _one_step(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    trainer.optimizer.step = lambda: None  # keep this step's gradients
    batch = next(iter(trainer._loader(epoch=0, start_batch=0)))
    result = trainer.train_step(batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return {"loss": result.loss, "grads": grads, "rows": batch["index"].tolist()}


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = _one_step(cfg)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_match_one_process(tiny_synth, tmp_path, local_loss):
    single = _one_step(_config(tiny_synth, tmp_path / "single"))
    cfg = _config(tiny_synth, tmp_path / "multi", local_loss=local_loss)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # each process saw its half of the same global batch
    assert ranks[0]["rows"] + ranks[1]["rows"] == single["rows"]
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-5
        assert r["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-5), name
