"""Training objectives: one small module per method, chosen with ``--method``.

Adding a method is one new file with an `Objective` subclass and one line in
`OBJECTIVES`. The trainer calls only ``loss``, ``after_step`` and the module's
state dict.
"""

from __future__ import annotations

from typing import Callable

from .active import ActiveClipPingObjective
from .base import Objective, ObjectiveSetup, StepContext
from .clip import ClipObjective
from .clip_ping import ClipPingObjective
from .declip import DeclipNnsObjective
from .relational import RelationalObjective
from .slip import SlipObjective

OBJECTIVES: dict[str, Callable[[ObjectiveSetup], Objective]] = {
    "clip": ClipObjective.from_setup,
    "clip-ping": ClipPingObjective.from_setup,
    "a-clip-ping": ActiveClipPingObjective.from_setup,
    "declip-nns": DeclipNnsObjective.from_setup,
    "slip": SlipObjective.from_setup,
    "relational": RelationalObjective.from_setup,
}


def build_objective(setup: ObjectiveSetup) -> Objective:
    """The objective of ``setup.cfg.method``, with its heads on ``setup.device``."""
    return OBJECTIVES[setup.cfg.method](setup)


__all__ = ["OBJECTIVES", "ActiveClipPingObjective", "ClipObjective", "ClipPingObjective", "DeclipNnsObjective", "Objective", "ObjectiveSetup",
           "RelationalObjective", "SlipObjective", "StepContext", "build_objective"]
