"""The import paths of the release before the stages became packages still work, for one release."""

from __future__ import annotations

import importlib
import sys
import warnings
from unittest import mock

import pytest

import clip_ping
from clip_ping import MOVED_MODULES

# The public names of the two old modules whose names are now packages: their faces still export each one.
OLD_BANKS_NAMES = [
    "BANK_FILES", "ExtractConfig", "FORMAT_VERSION", "FeatureBanks", "IDENTITY_DEFAULTS", "MANIFEST", "WORK_DIR",
    "check_table", "chunk_marker", "done_chunks", "duplicate_groups_of_captions", "duplicate_groups_of_hashes",
    "extract_banks", "extract_chunks", "identity_of", "normalize_caption", "open_banks", "read_json", "text_precision",
    "with_identity_defaults",
]
OLD_REPORT_NAMES = [
    "GROUP_ORDER", "MetricInfo", "NEIGHBOR_PAGE", "NOT_METRICS", "ReportConfig", "aggregate", "build_report",
    "format_value", "neighbor_pages", "report_from_config", "report_neighbor_pages", "run_metrics", "seed_stats",
]
# Old dotted paths of the names users and the command line reach for, and where each lives now.
OLD_PUBLIC_PATHS = {
    "clip_ping.trainer.Trainer": "clip_ping.training.trainer.Trainer",
    "clip_ping.trainer.TrainConfig": "clip_ping.training.train_config.TrainConfig",
    "clip_ping.trainer.train": "clip_ping.training.trainer.train",
    "clip_ping.train_config.TrainConfig": "clip_ping.training.TrainConfig",
    "clip_ping.student.create_student": "clip_ping.model.create_student",
    "clip_ping.student.load_student": "clip_ping.model.load_student",
    "clip_ping.losses.ClipPingLoss": "clip_ping.model.ClipPingLoss",
    "clip_ping.heads.NeighborGuidance": "clip_ping.model.NeighborGuidance",
    "clip_ping.checkpoints.load_checkpoint": "clip_ping.training.load_checkpoint",
    "clip_ping.checkpoints.nonfinite_tensors": "clip_ping.model.nonfinite_tensors",
    "clip_ping.hub_export.ExportConfig": "clip_ping.hub.ExportConfig",
    "clip_ping.hub_export.export_open_clip": "clip_ping.hub.export_open_clip",
    "clip_ping.pretrained.init_student": "clip_ping.hub.init_student",
    "clip_ping.model_card.model_card": "clip_ping.hub.model_card",
    "clip_ping.bank_format.open_banks": "clip_ping.banks.open_banks",
    "clip_ping.report_runs.group_runs": "clip_ping.report.group_runs",
    "clip_ping.run_logs.RunLogs": "clip_ping.training.RunLogs",
}


def resolve(dotted: str) -> object:
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.fixture
def forget_old_paths(monkeypatch):
    """Each test imports the old paths afresh (an earlier import would be cached, without its warning)."""
    for old in MOVED_MODULES:
        monkeypatch.delitem(sys.modules, old, raising=False)
        monkeypatch.delattr(clip_ping, old.rsplit(".", 1)[1], raising=False)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_is_its_new_module_with_a_warning(old, forget_old_paths):
    new = importlib.import_module(MOVED_MODULES[old])
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED_MODULES[old]}"):
        assert importlib.import_module(old) is new
    assert new.__name__ == new.__spec__.name == MOVED_MODULES[old]  # the new module keeps its own name and spec
    assert sys.modules[MOVED_MODULES[old]] is new


@pytest.mark.parametrize("old, new", sorted(OLD_PUBLIC_PATHS.items()))
def test_an_old_public_name_is_the_same_object(old, new, forget_old_paths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert resolve(old) is resolve(new)


def test_from_imports_of_old_paths_work(forget_old_paths):
    with pytest.warns(DeprecationWarning):
        from clip_ping.student import create_student
        from clip_ping.trainer import Trainer
    from clip_ping.model.student import create_student as new_create_student
    from clip_ping.training.trainer import Trainer as NewTrainer

    assert Trainer is NewTrainer and create_student is new_create_student


def test_patching_an_old_path_patches_the_module_that_runs(forget_old_paths):
    import clip_ping.training.trainer as trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with mock.patch("clip_ping.trainer.warmup_cosine_lr", return_value=0.5):
            assert trainer.warmup_cosine_lr(1, 1, 1, 1.0) == 0.5


@pytest.mark.parametrize("face, names", [("clip_ping.banks", OLD_BANKS_NAMES), ("clip_ping.report", OLD_REPORT_NAMES)])
def test_the_old_modules_that_became_packages_export_their_old_names(face, names):
    module = importlib.import_module(face)
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == []
    assert set(names) <= set(module.__all__)


@pytest.mark.parametrize("face", ["clip_ping.banks", "clip_ping.model", "clip_ping.training", "clip_ping.report",
                                  "clip_ping.hub", "clip_ping.knn", "clip_ping.objectives"])
def test_every_name_a_package_face_exports_is_there(face):
    module = importlib.import_module(face)
    assert [n for n in module.__all__ if not hasattr(module, n)] == []


def test_an_unknown_old_path_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("clip_ping.no_such_module")


def test_the_project_itself_uses_no_old_path():
    """The old paths are for users' code; the package, its tests and benchmarks name the new ones."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old_names = "|".join(sorted(old.rsplit(".", 1)[1] for old in MOVED_MODULES))
    dotted = re.compile(rf"\bclip_ping[./]({old_names})\b|\bfrom clip_ping import [^\n]*\b({old_names})\b")
    here = Path(__file__).resolve()
    users = [f"{path.relative_to(root)}:{text[:m.start()].count(chr(10)) + 1}"
             for folder in ("clip_ping", "tests", "benchmarks") for path in sorted((root / folder).rglob("*.py"))
             if path != here and path != root / "clip_ping" / "__init__.py"
             for text in [path.read_text()] for m in dotted.finditer(text)]
    assert users == []
