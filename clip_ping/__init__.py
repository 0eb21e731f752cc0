"""clip-ping: train lightweight CLIP models with CLIP-PING (nearest-neighbour guidance).

Pipeline, one package per stage (docs/ARCHITECTURE.md):
    data -> teachers -> banks -> knn -> model and objectives -> training -> evaluation, report, hub
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__version__ = "0.1.0"

# Module paths of the release before the stages became packages: each still imports, for one release,
# as the module it became (the same module object), with a DeprecationWarning.
MOVED_MODULES = {
    "clip_ping.bank_format": "clip_ping.banks.format",
    "clip_ping.bank_writer": "clip_ping.banks.writer",
    "clip_ping.student": "clip_ping.model.student",
    "clip_ping.heads": "clip_ping.model.heads",
    "clip_ping.losses": "clip_ping.model.losses",
    "clip_ping.trainer": "clip_ping.training.trainer",
    "clip_ping.train_config": "clip_ping.training.train_config",
    "clip_ping.checkpoints": "clip_ping.training.checkpoints",
    "clip_ping.run_folder": "clip_ping.training.run_folder",
    "clip_ping.run_logs": "clip_ping.training.run_logs",
    "clip_ping.schedule": "clip_ping.training.schedule",
    "clip_ping.report_plots": "clip_ping.report.plots",
    "clip_ping.report_runs": "clip_ping.report.runs",
    "clip_ping.hub_export": "clip_ping.hub.export",
    "clip_ping.model_card": "clip_ping.hub.model_card",
    "clip_ping.pretrained": "clip_ping.hub.pretrained",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path (``import clip_ping.trainer``) with the module it moved to."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # already executed under its new name; the import system has just put the old name's spec on it
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finders: an old file left in a tree must not win

# The stable Python API (clip_ping.api): the pipeline's stages as functions, one per command.
from .api import evaluate, export, extract, neighbors, train  # noqa: E402

__all__ = ["__version__", "evaluate", "export", "extract", "neighbors", "train"]
