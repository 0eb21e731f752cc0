"""The few places where supported torch releases (2.4 and newer) behave differently, each in one function.

- `checkpoint_in_place`: activation checkpointing of a module whose parameter names stay as they are.
  torch's composable ``checkpoint`` does that too, but before torch 2.5 its pre-forward hook drops
  keyword arguments when it recomputes the forward in the backward pass: open_clip's text blocks,
  called with ``attn_mask=``, would be recomputed without their causal mask and give silently wrong
  gradients. ``torch.utils.checkpoint`` (non-reentrant) passes them on in every release.
- `close_process_group`: before torch 2.6, destroying a gloo process group right after asynchronous
  collectives (the banks' and the neighbour search's broadcasts) could deadlock on the GIL in the
  group's destructor; a barrier first leaves no collective in flight.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    # the class's forward, looked up at call time, so a deep copy of the module checkpoints its own weights
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_in_place(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in the backward pass instead of keeping them.

    Only ``forward`` is replaced (on this instance), so parameter names, state dicts and hooks stay
    as they are, and every argument, keyword ones included, reaches the recomputation.
    """
    module.forward = types.MethodType(_checkpointed_forward, module)  # type: ignore[method-assign]


def close_process_group(clean_exit: bool = True) -> None:
    """Leave the default process group, if one is open.

    On a clean exit every process first meets at a barrier, so no collective is in flight when the
    group is destroyed. After an error the other processes may never reach it: there the group is
    destroyed at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean_exit:
        dist.barrier()
    dist.destroy_process_group()
