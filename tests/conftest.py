import json
import os
import sys

import pytest

# everything loads from installed packages; a hub lookup would be a bug
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one torch thread each (also in the processes they start),
    # since threads of one process that wait for each other at every op crawl when the cores are shared.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where CUDA is (``pytest -m cuda`` on a GPU node); here they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def crash_and_resume(cfg_of, tmp_path, crash_step=2):
    """Run straight; run again crashing before ``crash_step`` (after a checkpoint) and resume;
    return both final checkpoints. ``cfg_of(out, **overrides)`` makes each run's TrainConfig."""
    from clip_ping.training.checkpoints import load_checkpoint
    from clip_ping.training.trainer import Trainer

    Trainer(cfg_of(tmp_path / "straight")).fit()
    crashing = Trainer(cfg_of(tmp_path / "resumed"))
    real_step = crashing.train_step

    def crash(batch):
        if crashing.step == crash_step:
            raise KeyboardInterrupt  # stands in for a kill after the checkpoint of step crash_step
        return real_step(batch)

    crashing.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    Trainer(cfg_of(tmp_path / "resumed", resume="latest")).fit()
    return (load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt"),
            load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt"))


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of ``clip-ping ARGV`` run in this process (argparse's refusals exit through SystemExit)."""
    from clip_ping.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one ``error:`` line of a refused command's stderr (and no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def data(tiny_synth, tmp_path):
    """A copy of the tiny data set that a test may change."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_synth, copy)
    return copy


def load_benchmark_script(name: str):
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A tiny built-in data set (48 train / 8 val / 16 test pairs, 32 px), made once per session."""
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(SynthConfig(out=str(out), seed=3, n_train=48, n_val=8, n_test=16, image_size=32, workers=1),
                       progress=False)
    return out


TINY_MODEL = "clip-ping-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random open_clip model (registered from a config file written here), its tokenizer and transform."""
    import open_clip
    import torch

    config_dir = tmp_path_factory.mktemp("model_configs")
    (config_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    model.eval()
    return model, open_clip.get_tokenizer(TINY_MODEL), preprocess


def write_random_bank(data_dir, split: str = "train", k: int = 3, seed: int = 0, dims=(24, 16),
                      teachers=("test-tiny-image", "test-tiny-text")):
    """A bank of random unit features for ``data_dir``'s split (right count and data fingerprint) and its
    neighbour tables: enough for CLIP-PING to train without running the teachers. The manifest names
    ``teachers`` (the tiny test teachers by default, whose dims are the default ``dims``)."""
    import numpy as np

    from clip_ping.data.table import open_table
    from clip_ping.knn import NeighborsConfig, build_neighbors

    table = open_table(data_dir, split)
    n, rng = len(table), np.random.default_rng(seed)
    bank = data_dir / "banks"
    bank.mkdir()
    for name, d in (("image", dims[0]), ("text", dims[1])):
        x = rng.standard_normal((n, d))
        np.save(bank / f"{name}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        np.save(bank / f"{name}_group.npy", np.arange(n, dtype=np.int64))
    np.save(bank / "valid.npy", np.ones(n, dtype=bool))
    manifest = {"count": n, "dims": {"image": dims[0], "text": dims[1]}, "fingerprint": f"random-bank-{seed}",
                "data_fingerprint": table.fingerprint(),
                "teachers": {"image": {"name": teachers[0], "dim": dims[0]}, "text": {"name": teachers[1], "dim": dims[1]}}}
    (bank / "manifest.json").write_text(json.dumps(manifest))
    build_neighbors(NeighborsConfig(banks=str(bank), k=k, method="exact", progress=False))
    return bank


@pytest.fixture(scope="session")
def tiny_banked(tiny_synth, tmp_path_factory):
    """The tiny data set with a random bank and neighbour tables (k=3) in ``banks/``."""
    import shutil

    data = tmp_path_factory.mktemp("banked") / "data"
    shutil.copytree(tiny_synth, data)
    write_random_bank(data)
    return data


# --------------------------------------------------------------------------- tiny teachers

def _register_tiny_teachers():
    """Two tiny deterministic teachers (24-d image, 16-d text, the random bank's dims) for A-CLIP-PING tests:
    a strided convolution with mean pooling at 40 px, and a fixed embedding of character codes."""
    import torch
    from torchvision import transforms as T

    from clip_ping.teachers import _IMAGE_TEACHERS, _TEXT_TEACHERS, ImageTeacher, TextTeacher

    class TinyImageTeacher(ImageTeacher):
        def __init__(self, device="cpu"):
            self.name, self.dim, self.device = "test-tiny-image", 24, device
            g = torch.Generator().manual_seed(0)
            self.model = torch.nn.Conv2d(3, 24, 8, stride=8)
            with torch.no_grad():
                self.model.weight.copy_(torch.randn(self.model.weight.shape, generator=g) * 0.1)
                self.model.bias.zero_()
            self.model.requires_grad_(False)
            self._transform = T.Compose([T.Resize(40), T.CenterCrop(40), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)])


        def _forward(self, images):
            return self.model(images).mean(dim=(2, 3))

    class TinyTextTeacher(TextTeacher):
        def __init__(self, device="cpu"):
            self.name, self.dim, self.device = "test-tiny-text", 16, device
            self.table = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))

        def _forward(self, texts):
            return torch.stack([self.table[torch.tensor([ord(c) % 128 for c in t])].mean(0) for t in texts])

    _IMAGE_TEACHERS.setdefault("test-tiny-image", TinyImageTeacher)
    _TEXT_TEACHERS.setdefault("test-tiny-text", TinyTextTeacher)


_register_tiny_teachers()
