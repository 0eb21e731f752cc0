"""Two gloo processes on one global batch give the loss and gradients of one process."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clip_ping.training.trainer import TrainConfig, Trainer


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
    cached = trainer.image_cache is not None and trainer.image_cache.filled
    return {"loss": result.loss, "grads": grads, "rows": batch["index"].tolist(), "cached": cached}


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = _one_step(cfg)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("extra", [pytest.param({}, marks=pytest.mark.floor), pytest.param({"local_loss": True}, marks=pytest.mark.floor),
                                   {"duplicate_captions": "positives"},
                                   {"duplicate_captions": "mask", "local_loss": True}, {"image_cache": "on"}])
def test_two_processes_match_one_process(tiny_synth, tmp_path, extra):
    one_process = {k: v for k, v in extra.items() if k not in ("local_loss", "image_cache")}
    single = _one_step(_config(tiny_synth, tmp_path / "single", image_cache="off", **one_process))
    assert not single["cached"]
    cfg = _config(tiny_synth, tmp_path / "multi", **extra)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["cached"] == (extra.get("image_cache") == "on") for r in ranks)
    # each process saw its half of the same global batch
    assert ranks[0]["rows"] + ranks[1]["rows"] == single["rows"]
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-5
        assert r["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-5), name


def _fit_worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = Trainer(cfg).fit()
    torch.save(summary, os.path.join(out_dir, f"fit{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_an_undecodable_image_on_one_process_does_not_hang_the_others(tiny_synth, tmp_path):
    import shutil
    import time

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    rows = (data / "train.csv").read_text().splitlines()
    broken = data / rows[5].split(",")[0]  # one image of the first epoch, on one process only
    broken.write_bytes(b"not a png")
    cfg = _config(data, tmp_path / "run", steps=6, batch_size=8, save_every=100, log_every=1, max_skipped_fraction=0.5)
    ctx = mp.start_processes(_fit_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, start_method="spawn",
                             join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes hung on a batch with an undecodable image")
    summaries = [torch.load(tmp_path / f"fit{r}.pt") for r in (0, 1)]
    assert all(s["step"] == 6 for s in summaries)
    # the bad row is counted where it fell; the other process trimmed one row to keep the batches equal
    assert sorted(s["skipped_images"] for s in summaries) == [1, 1]


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.cuda)])
def test_the_collectives_run_on_the_backends_device(tmp_path, backend):
    """One process in a group of the backend clip-ping picks (gloo on the CPU, NCCL on a GPU): every
    collective helper puts its tensors where the backend needs them (NCCL: the GPU only) and gives
    its result back on the caller's device."""
    import torch.distributed as dist

    from clip_ping import distributed as d

    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=device if backend == "nccl" else None)
    try:
        assert d.collective_device() == device
        x = torch.randn(3, 4, device=device, requires_grad=True)
        gathered = d.gather_with_grad(x)
        gathered.sum().backward()
        assert torch.equal(gathered.detach(), x.detach()) and torch.equal(x.grad, torch.ones_like(x))
        ints = torch.arange(5)  # on the CPU: under NCCL it travels to the GPU and back
        assert torch.equal(d.gather_ints(ints), ints) and d.gather_ints(ints).device == ints.device
        assert d.all_reduce_mean({"loss": 1.5, "lr": 0.1}) == {"loss": 1.5, "lr": 0.1}
        assert d.all_reduce_sum([2, 3]) == [2, 3]
        assert d.all_ranks_true(True) and not d.all_ranks_true(False)
        from clip_ping.knn.fast import gather_list  # the neighbour search's blocks

        (part,) = gather_list(ints)
        assert torch.equal(part, ints) and part.device == ints.device
    finally:
        dist.destroy_process_group()
