"""Training objectives: one small module per method, chosen with ``--method``.

Adding a method is one new file with an `Objective` subclass (with a
``from_setup`` classmethod) and one line in `OBJECTIVES`. The trainer calls only ``loss``, ``after_step`` and the module's
state dict.
"""

from __future__ import annotations

from .active import ActiveClipPingObjective
from .base import Objective, ObjectiveSettings, ObjectiveSetup, StepContext
from .clip import ClipObjective
from .clip_ping import ClipPingObjective
from .declip import DeclipNnsObjective
from .relational import RelationalObjective
from .slip import SlipObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (ClipObjective, ClipPingObjective, ActiveClipPingObjective, DeclipNnsObjective, SlipObjective,
                RelationalObjective)
}


def build_objective(setup: ObjectiveSetup) -> Objective:
    """The objective of ``setup.cfg.method``, with its heads on ``setup.device``."""
    return OBJECTIVES[setup.cfg.method].from_setup(setup)


__all__ = ["OBJECTIVES", "ActiveClipPingObjective", "ClipObjective", "ClipPingObjective", "DeclipNnsObjective", "Objective",
           "ObjectiveSettings", "ObjectiveSetup", "RelationalObjective", "SlipObjective", "StepContext", "build_objective"]
