"""No file clip-ping loads can run code: a checkpoint whose pickle calls ``os.system`` is refused by every
command that reads a torch file, in one line, and the command it names converts a trusted old checkpoint."""

from __future__ import annotations

import ast
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_ping.cli import main
from clip_ping.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.floor  # torch.load of every supported torch
ROOT = Path(__file__).resolve().parents[1]
MODEL = "ViT-XXS-8-64"


class _RunsCommand:
    """Unpickling this calls ``os.system(command)``: what a hostile checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_evil(path: Path, marker: Path, like_checkpoint: bool = True) -> Path:
    from clip_ping.model.student import create_student

    weights = create_student(MODEL, seed=0)[0].state_dict()
    payload = {"model": weights, "model_name": MODEL, "method": "clip", "step": 1,
               "config": {"method": "clip"}, "hook": _RunsCommand(f"touch {marker}")}
    torch.save(payload if like_checkpoint else {**weights, "hook": _RunsCommand(f"touch {marker}")}, path)
    return path


@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    return _write_evil(tmp_path / "evil.pt", marker), marker


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _loaders(data: Path, out: Path, evil: Path) -> dict[str, list[object]]:
    """Every command that reads a torch file the user names, pointed at ``evil``."""
    train = ["train", "--data", data, "--out", out / "run", "--steps", "2", "--batch-size", "8", "--workers", "0",
             "--no-progress", "--no-tensorboard", "--method", "clip", "--model", MODEL]
    run_dir = out / "evil-run" / "checkpoints"
    run_dir.mkdir(parents=True)
    shutil.copy(evil, run_dir / "latest.pt")
    return {
        "eval --checkpoint FILE": ["eval", "--checkpoint", evil, "--data", data, "--out", out / "eval.json"],
        "eval --checkpoint RUN": ["eval", "--checkpoint", out / "evil-run", "--data", data, "--out", out / "e2.json"],
        "export --checkpoint": ["export", "--checkpoint", evil, "--out", out / "export"],
        "train --resume PATH": [*train, "--resume", evil],
        "train --init-from": [*train, "--init-from", evil],
        "train --init-from --dry-run": [*train, "--init-from", evil, "--dry-run"],
        "extract --image-teacher open_clip:M:FILE": ["extract", "--data", data / "train.csv", "--out", out / "banks",
                                                     "--image-teacher", f"open_clip:{MODEL}:{evil}",
                                                     "--text-teacher", "test-tiny-text", "--workers", "0",
                                                     "--no-progress"],
        "extract --image-teacher timm:ARCH:FILE": ["extract", "--data", data / "train.csv", "--out", out / "banks2",
                                                   "--image-teacher", f"timm:resnet18:{evil}",
                                                   "--text-teacher", "test-tiny-text", "--workers", "0",
                                                   "--no-progress"],
    }


CASES = ["eval --checkpoint FILE", "eval --checkpoint RUN", "export --checkpoint", "train --resume PATH",
         "train --init-from", "train --init-from --dry-run", "extract --image-teacher open_clip:M:FILE",
         "extract --image-teacher timm:ARCH:FILE"]


@pytest.mark.parametrize("case", CASES)
def test_a_malicious_checkpoint_runs_no_code_and_gets_one_line(tiny_synth, tmp_path, capsys, evil, case):
    path, marker = evil
    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    code, err = _run(capsys, *_loaders(data, tmp_path, path)[case])
    assert not marker.exists(), "loading the file ran its code"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "evil.pt" in lines[0] or "latest.pt" in lines[0]
    if "--resume" in case or "--checkpoint" in case:  # a checkpoint: the line names the conversion command
        assert "clip-ping convert-checkpoint --checkpoint" in lines[0] and "--trust-this-file" in lines[0]


def test_conversion_needs_the_users_word_and_never_overwrites(tmp_path, capsys, evil):
    path, marker = evil
    code, err = _run(capsys, "convert-checkpoint", "--checkpoint", path)
    assert code == 2 and "--trust-this-file" in err and not marker.exists()
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"the user's own file")
    code, err = _run(capsys, "convert-checkpoint", "--checkpoint", path, "--out", taken, "--trust-this-file")
    assert code == 2 and "does not overwrite" in err and taken.read_bytes() == b"the user's own file"
    assert not marker.exists()


def _old_format_checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    """A checkpoint as clip-ping wrote it before: numpy's RNG state as a tuple holding an ndarray, a Path in
    the config. Only the unsafe loader reads it."""
    np.random.seed(5)
    random.seed(5)
    state = {"model": {"w": torch.arange(4.0)}, "model_name": MODEL, "method": "clip", "step": 3,
             "config": {"out": Path("/runs/x"), "lr": 1e-3, "betas": (0.9, 0.98)},
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    return path, state


def test_an_old_checkpoint_is_refused_then_converted_once_trusted(tmp_path, capsys):
    path, state = _old_format_checkpoint(tmp_path)
    code, err = _run(capsys, "export", "--checkpoint", path, "--out", tmp_path / "export")
    assert code == 2 and f"clip-ping convert-checkpoint --checkpoint {path} --trust-this-file" in err
    original = path.read_bytes()
    code, _ = _run(capsys, "convert-checkpoint", "--checkpoint", path, "--trust-this-file")
    converted = tmp_path / "old.safe.pt"
    assert code == 0 and converted.is_file() and path.read_bytes() == original
    safe = load_checkpoint(converted)  # the safe loader reads it
    assert torch.equal(safe["model"]["w"], state["model"]["w"]) and safe["step"] == 3
    assert safe["config"] == {"out": "/runs/x", "lr": 1e-3, "betas": (0.9, 0.98)}
    from clip_ping.training.checkpoints import set_numpy_rng_state

    set_numpy_rng_state(safe["rng"]["numpy"])
    after_restore = np.random.rand(3)
    np.random.set_state(state["rng"]["numpy"])
    assert np.array_equal(after_restore, np.random.rand(3))


def test_a_training_checkpoint_loads_safely_and_restores_numpys_rng(tiny_synth, tmp_path):
    from clip_ping.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(data=str(tiny_synth), out=str(tmp_path / "run"), method="clip", model=MODEL, batch_size=8,
                      steps=2, warmup_steps=1, workers=0, progress=False, tensorboard=False, log_to="jsonl")
    trainer = Trainer(cfg)
    trainer.fit()
    np.random.seed(11)
    expected = np.random.get_state()
    state = trainer.state_dict()
    torch.save(state, tmp_path / "now.pt")
    reread = torch.load(tmp_path / "now.pt", weights_only=True)  # raises if anything needs the unsafe loader
    np.random.seed(99)
    from clip_ping.training.checkpoints import set_numpy_rng_state

    set_numpy_rng_state(reread["rng"]["numpy"])
    got = np.random.get_state()
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def _torch_load_calls(path: Path) -> list[tuple[int, str, ast.Call]]:
    """(line, innermost enclosing function, call) of every ``torch.load(...)`` in ``path``."""
    calls: list[tuple[int, str, ast.Call]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "load" \
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "torch":
                calls.append((child.lineno, function, child))
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return calls


def test_every_torch_load_in_the_source_is_weights_only():
    """A new ``torch.load`` without ``weights_only=True`` fails here; the one exception is the converter the user
    runs knowingly with --trust-this-file."""
    unsafe = []
    for path in sorted([*ROOT.joinpath("clip_ping").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")]):
        for line, function, call in _torch_load_calls(path):
            flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            safe = isinstance(flag, ast.Constant) and flag.value is True
            if not safe and (path.name, function) != ("checkpoints.py", "convert_trusted_checkpoint"):
                unsafe.append(f"{path.relative_to(ROOT)}:{line} in {function}")
    assert unsafe == []
    found = sum(len(_torch_load_calls(p)) for p in ROOT.joinpath("clip_ping").rglob("*.py"))
    assert found >= 2  # the scan sees the safe loader and the converter: it is not looking at nothing
