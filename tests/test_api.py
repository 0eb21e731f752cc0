"""The Python API: the stages as functions taking a config dataclass, a dict or a YAML path."""

import json

import pytest
import yaml

import clip_ping
from clip_ping import api
from clip_ping.errors import ClipPingError
from clip_ping.training.trainer import TrainConfig


def test_train_evaluate_export_from_python(tiny_synth, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": str(tiny_synth), "method": "clip", "batch_size": 8,
                                                        "workers": 0, "progress": False}))
    run = clip_ping.train(str(tmp_path / "run.yaml"), out=str(tmp_path / "run"), steps=2)
    assert run["step"] == 2 and (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()
    again = clip_ping.train(TrainConfig(data=str(tiny_synth), method="clip", batch_size=8, workers=0,
                                        progress=False, out=str(tmp_path / "run2"), steps=1))
    assert again["step"] == 1
    scores = clip_ping.evaluate({"checkpoint": str(tmp_path / "run"), "data": str(tiny_synth)}, workers=0,
                                progress=False, linear_probe=False)
    assert scores["retrieval"]["n_texts"] == 16
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n_texts"] == 16
    exported = clip_ping.export(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "export"))
    assert "| retrieval image to text | R@1 |" in (tmp_path / "export" / "README.md").read_text()
    assert exported["exported"] == str(tmp_path / "export")


def test_every_stage_is_a_function_at_the_top_level():
    """`clip_ping.<stage>` is the function of `clip_ping.api`, also after the stage modules are imported."""
    import clip_ping.hub.export  # noqa: F401  (importing a submodule must not shadow the function)
    import clip_ping.knn  # noqa: F401

    for name in ("train", "extract", "neighbors", "evaluate", "export"):
        assert getattr(clip_ping, name) is getattr(api, name) and callable(getattr(clip_ping, name)), name
        assert name in clip_ping.__all__


def test_neighbors_from_python(tiny_banked, tmp_path):
    """`clip_ping.neighbors` builds the tables the command builds (on a copy: the fixture is shared)."""
    import shutil

    from clip_ping.knn import load_neighbors

    banks = tmp_path / "banks"
    shutil.copytree(tiny_banked / "banks", banks)
    before = load_neighbors(banks)
    assert before.k == 3
    clip_ping.neighbors(banks=str(banks), k=2, overwrite=True, progress=False)
    after = load_neighbors(banks)
    assert after.k == 2 and len(after) == len(before)
    assert (after.image[:, :2] == before.image[:, :2]).all()  # the same exact search, two kept


def test_api_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(ClipPingError, match="unknown config key 'lamda_nn'.*did you mean 'lambda_nn'"):
        clip_ping.train({"lamda_nn": 0.5})
    with pytest.raises(ClipPingError, match="takes a TrainConfig, a dict or a YAML path"):
        clip_ping.train(42)
    with pytest.raises(ClipPingError, match="config file not found"):
        clip_ping.evaluate(tmp_path / "missing.yaml")
