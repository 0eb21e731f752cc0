"""The paper-setting recipes (configs/*-vit-xs): every stage's --dry-run on a shard folder made here,
and the mistakes that must stop a run before any work starts."""

import json
from pathlib import Path

import pytest
from conftest import write_random_bank

from clip_ping.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "configs"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def shards(tiny_synth, tmp_path_factory):
    """The tiny data set as WebDataset shards, with a bank (random features) and neighbour tables."""
    out = tmp_path_factory.mktemp("shards") / "data"
    assert main(["data", "convert", "--src", str(tiny_synth), "--out", str(out), "--samples-per-shard", "16"]) == 0
    write_random_bank(out)
    return out


@pytest.mark.parametrize("recipe", ["cc3m-vit-xs", "cc12m-vit-xs"])
def test_every_stage_of_the_recipe_plans_on_a_shard_folder(shards, capsys, recipe):
    folder = RECIPES / recipe
    code, out, err = _run(capsys, "extract", "--config", folder / "extract.yaml", "--data", shards,
                          "--out", shards / "new-banks", "--device", "cpu", "--dry-run")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["rows"] == 48 and plan["bank_state"] == "new" and plan["teachers"]["image_dim"] == 1280
    assert not (shards / "new-banks").exists()  # a plan does no work

    code, out, err = _run(capsys, "neighbors", "--config", folder / "neighbors.yaml", "--banks", shards / "banks", "--dry-run")
    assert code == 0, err
    assert json.loads(out)["rows"] == 48

    code, out, err = _run(capsys, "train", "--config", folder / "train.yaml", "--data", shards, "--banks", shards / "banks",
                          "--out", shards / "run", "--batch-size", 16, "--dry-run")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == "ViT-XS-16" and plan["steps_per_epoch"] == 3 and plan["total_steps"] == 3 * 30
    assert plan["device"] == "cpu" and plan["uses_banks"] is True
    assert float(plan["train_flop_per_sample"].split()[0]) > 1.0 and "GB per process" in plan["activation_memory"]
    assert not (shards / "run").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_work(shards, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, _, err = _run(capsys, "train", "--config", RECIPES / "cc3m-vit-xs" / "train.yaml", "--data", shards,
                        "--banks", shards / "banks", "--batch-size", 16, "--dry-run")
    assert code == 2 and "does not split over 3 processes" in err and "Traceback" not in err


def test_a_bank_of_other_shards_is_refused_before_work(shards, tmp_path, capsys):
    import shutil

    other = tmp_path / "banks"
    shutil.copytree(shards / "banks", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["data_fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "train", "--config", RECIPES / "cc3m-vit-xs" / "train.yaml", "--data", shards,
                        "--banks", other, "--batch-size", 16, "--dry-run")
    assert code == 2 and "another data set" in err


def test_a_missing_shard_is_refused_before_work(shards, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    next(data.glob("train*.tar")).unlink()
    code, _, err = _run(capsys, "train", "--config", RECIPES / "cc3m-vit-xs" / "train.yaml", "--data", data,
                        "--banks", data / "banks", "--batch-size", 16, "--dry-run")
    assert code == 2 and ".tar" in err and "Traceback" not in err


def test_the_recipes_evaluation_suite_reads_as_the_field_reports():
    from clip_ping.evaluation.suite_file import read_suite

    tasks = read_suite(RECIPES / "eval-suite.yaml")
    kinds = {t.name: (t.kind, t.layout) for t in tasks}
    assert kinds["imagenet-1k"] == ("zeroshot", "folders") and kinds["mscoco-5k"] == ("retrieval", "karpathy")
    assert {k for k, _ in kinds.values()} == {"zeroshot", "retrieval", "linear_probe"}
    imagenet = next(t for t in tasks if t.name == "imagenet-1k")
    assert (imagenet.classnames, imagenet.templates, imagenet.split) == ("imagenet", "openai", "val")
