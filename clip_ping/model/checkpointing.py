"""Activation checkpointing that keeps a module's parameter names and passes every argument on.

torch's composable ``checkpoint`` keeps names too, but before torch 2.5 its pre-forward hook drops
keyword arguments when it recomputes the forward in the backward pass: open_clip's text blocks,
called with ``attn_mask=``, would be recomputed without their causal mask and give silently wrong
gradients. ``torch.utils.checkpoint`` (non-reentrant) passes them on in every supported release
(torch 2.4 and newer), so this is the one place gradient checkpointing is set up.
"""

from __future__ import annotations

import types
from typing import Any

import torch
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
