"""torch.distributed helpers: the device and process group that torchrun describes,
and a gather that keeps gradients (so contrastive logits span the global batch).

Every process picks its own device from ``LOCAL_RANK`` (``cuda:LOCAL_RANK``);
the process group uses NCCL on CUDA and gloo on the CPU, and collectives are
built on the device that backend expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from .errors import ConfigError


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: there bf16 autocast is faster than fp32; elsewhere
    (an AVX2-only CPU, where oneDNN emulates it) a bf16 matmul is 25-70x slower."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@contextlib.contextmanager
def training_autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The context of the student's forward in training: autocast for bf16 / fp16 and, on a CPU,
    scaled-dot-product attention through its math backend.

    torch's CPU flash-attention backward is about 6x slower in bf16 than in fp32 (37 against
    6 ms a call for ViT-XXS-8-64), enough to make bf16 steps slower than fp32 ones; the math
    backend's matmuls run in bf16 like the rest (BENCHMARKS.md, "bf16 attention on a CPU").
    """
    if precision == "fp32":
        yield
        return
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if device.type == "cpu":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def warn_if_bf16_is_emulated(precision: str, device: str | torch.device, log: logging.Logger, what: str) -> None:
    """One warning, where bf16 is asked for on a device that would emulate it (``what`` runs many times slower)."""
    if precision == "bf16" and not native_bf16(device):
        log.warning("precision bf16 on %s, which has no native bf16 arithmetic: %s many times slower than in fp32 "
                    "(see BENCHMARKS.md; try --precision fp32)", device, what)


def resolve_device(name: str) -> torch.device:
    """The torch device of this process for a ``--device`` value.

    ``auto`` is this process's GPU when CUDA is present, else the CPU; ``cuda``
    without an index is ``cuda:LOCAL_RANK``, so every rank of a node gets its own GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': {name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': {name!r} asked for, but no CUDA GPU is visible (use auto or cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device': {device} does not exist; this machine has "
                              f"{torch.cuda.device_count()} GPU(s) (LOCAL_RANK={local_rank()})")
        torch.cuda.set_device(device)
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"config key 'device': {name!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


def init_from_env(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes: NCCL for a CUDA device, gloo otherwise.
    A no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return rank_and_world()


@contextlib.contextmanager
def joined_process_group(device: torch.device | None = None) -> Iterator[tuple[int, int]]:
    """(rank, world) of torchrun's process group for a stage, joined on entry (`init_from_env`) and left
    on exit when the stage joined it: a group left open at exit can abort the process (gloo threads)
    or hang in its destructor. Every process meets at a barrier first, unless the stage failed."""
    joined_here = dist.is_available() and not dist.is_initialized()
    rank_and_world_size = init_from_env(device)
    try:
        yield rank_and_world_size
    except BaseException:
        if joined_here:
            close_process_group(clean_exit=False)
        raise
    if joined_here:
        close_process_group()


def collective_device() -> torch.device:
    """Where collective tensors must live: this process's GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All rows of ``x`` from every process, in rank order, differentiable
    (the backward sums every process's gradient and returns this process's rows).

    Every process must pass the same number of rows.
    """
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_ints(x: torch.Tensor) -> torch.Tensor:
    """All rows of an integer tensor from every process, in rank order (no gradient)."""
    parts = [torch.empty_like(x, device=collective_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.to(collective_device()).contiguous())
    return torch.cat(parts).to(x.device)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All rows of ``x`` (any dtype, no gradient) from every process, in rank order; ``x`` itself
    for one process. For state every process must hold alike, e.g. queues of embeddings."""
    if rank_and_world()[1] == 1:
        return x
    return gather_ints(x.detach())


def own_rows(n_local: int) -> slice:
    """This process's rows of a batch gathered in rank order (`gather_rows` of equal batches)."""
    rank, _ = rank_and_world()
    return slice(rank * n_local, (rank + 1) * n_local)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over processes of each value (for logging)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum(values: list[int]) -> list[int]:
    """The sums over processes of a few integers (every process must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.int64, device=collective_device())
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a MIN all-reduce; every process must call it)."""
    return all_reduce_min(1 if flag else 0) == 1


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over processes (every process must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def close_process_group(clean_exit: bool = True) -> None:
    """Leave the default process group, if one is open.

    Before torch 2.6, destroying a gloo process group right after asynchronous collectives (the
    banks' and the neighbour search's broadcasts) could deadlock on the GIL in the group's
    destructor; a barrier first leaves no collective in flight.

    On a clean exit every process first meets at a barrier, so no collective is in flight when the
    group is destroyed. After an error the other processes may never reach it: there the group is
    destroyed at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean_exit:
        dist.barrier()
    dist.destroy_process_group()
