"""torch.compile of the image teacher: when it is used, that it gives the uncompiled features at any
batch size with one compilation, and that a failed compile falls back to the uncompiled teacher."""

from __future__ import annotations

import logging

import pytest
import torch

from clip_ping.errors import ConfigError
from clip_ping.teachers import base as teacher_base
from clip_ping.teachers import load_image_teacher
from clip_ping.teachers.base import AUTO_COMPILE_MIN_IMAGES, compile_wanted


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


@pytest.mark.floor
def test_compile_wanted_follows_the_setting_the_device_the_compiler_and_the_amount_of_work(monkeypatch):
    assert compile_wanted("on", "cuda", 1) and not compile_wanted("off", "cpu", 10**9)
    assert compile_wanted("auto", "cpu", AUTO_COMPILE_MIN_IMAGES) == bool(
        teacher_base.shutil.which("g++") or teacher_base.shutil.which("c++"))
    assert not compile_wanted("auto", "cpu", AUTO_COMPILE_MIN_IMAGES - 1)  # too little work to win the compile back
    assert not compile_wanted("auto", "cuda", 10**9)
    monkeypatch.setattr(teacher_base.shutil, "which", lambda name: None)
    assert not compile_wanted("auto", "cpu", 10**9)  # inductor needs a C++ compiler
    with pytest.raises(ConfigError, match="auto, on, off"):
        compile_wanted("yes", "cpu", 1)


@pytest.mark.floor
def test_a_compiled_teacher_gives_the_uncompiled_features_at_any_batch_size_with_one_compilation():
    from torch._dynamo.utils import counters

    eager, compiled = load_image_teacher("test-tiny-image"), load_image_teacher("test-tiny-image")
    torch._dynamo.reset()
    counters.clear()
    compiled.compile(4)
    for rows, seed in ((4, 0), (3, 1), (9, 2), (1, 3)):  # exact, padded, split (4 + 4 + 1 padded), padded
        x = _images(rows, seed)
        got, want = compiled.encode(x), eager.encode(x)
        assert got.shape == want.shape == (rows, 24)
        assert torch.allclose(got, want, atol=1e-5), rows
    assert compiled._fixed_rows == 4 and compiled._compiled_ran  # no fallback happened
    assert counters["stats"]["unique_graphs"] == 1  # every call had the compiled shape


def test_a_failed_compile_warns_once_and_runs_the_teacher_uncompiled(monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")

    def broken_compile(model, **options):
        return Broken()

    eager, teacher = load_image_teacher("test-tiny-image"), load_image_teacher("test-tiny-image")
    monkeypatch.setattr(teacher_base.torch, "compile", broken_compile)
    teacher.compile(4)
    x = _images(6, 4)
    with caplog.at_level(logging.WARNING):
        got = teacher.encode(x)
    assert torch.equal(got, eager.encode(x))
    assert "torch.compile failed (InductorError: no working C++ compiler); running it uncompiled" in caplog.text
    assert teacher._fixed_rows == 0 and isinstance(teacher.model, torch.nn.Module)
    assert torch.equal(teacher.encode(x), got)  # and stays uncompiled


def test_an_error_after_a_compiled_call_succeeded_is_raised_not_hidden():
    teacher = load_image_teacher("test-tiny-image")
    teacher.compile(2)
    teacher.encode(_images(2, 5))
    with pytest.raises(RuntimeError):
        teacher.encode(torch.zeros(2, 5, 40, 40))  # 5 channels: a real error of the input


def test_a_teacher_without_a_torch_module_cannot_be_compiled():
    from clip_ping.teachers.base import ImageTeacher

    class Plain(ImageTeacher):
        name, dim = "plain", 2

    with pytest.raises(ConfigError, match="no torch module to compile"):
        Plain().compile(4)


def test_extract_with_the_image_teacher_compiled_writes_the_uncompiled_bank(tiny_synth, tmp_path, caplog):
    import numpy as np

    from clip_ping.banks import ExtractConfig, extract_banks

    def bank(name: str, compile: str):
        cfg = ExtractConfig(data=str(tiny_synth), out=str(tmp_path / name), image_teacher="test-tiny-image",
                            text_teacher="test-tiny-text", batch_size=16, chunk_size=64, workers=0, progress=False,
                            compile=compile)
        return np.load(extract_banks(cfg) / "image.npy").astype(np.float32)

    with caplog.at_level(logging.INFO):
        compiled = bank("compiled", "on")
    assert "compiling the image teacher (torch.compile, 16 rows a call)" in caplog.text
    assert "torch.compile failed" not in caplog.text
    uncompiled = bank("uncompiled", "off")
    assert compiled.shape == uncompiled.shape and np.abs(compiled).max() > 0
    np.testing.assert_allclose(compiled, uncompiled, atol=2e-3)  # float16 storage


def test_a_clip_ping_with_the_online_teacher_compiled_trains_as_uncompiled(tiny_model, tiny_banked, tmp_path):
    from conftest import TINY_MODEL

    from clip_ping.training.trainer import TrainConfig, Trainer

    def run(name: str, compile: str) -> Trainer:
        cfg = TrainConfig(data=str(tiny_banked), out=str(tmp_path / name), method="a-clip-ping", model=TINY_MODEL,
                          batch_size=8, steps=2, warmup_steps=1, workers=0, save_every=100, progress=False,
                          tensorboard=False, neighbor_topk=3, teacher_compile=compile)
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    compiled, uncompiled = run("compiled", "on"), run("uncompiled", "off")
    assert compiled.objective.teachers.image._compiled_ran and compiled.objective.teachers.image._fixed_rows == 8
    assert uncompiled.objective.teachers.image._fixed_rows == 0
    for (name, a), b in zip(compiled.model.state_dict().items(), uncompiled.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
