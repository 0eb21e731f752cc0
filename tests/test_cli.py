"""The command line end to end on a tiny data set, and one-line errors for user mistakes."""

import json
import shutil

import open_clip
import pytest
import torch
from PIL import Image

from clip_ping.cli import main, requested_command


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny built-in data set (as `tiny_synth`) taken through extract and neighbours once."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--n-train", "48", "--n-val", "8", "--n-test", "16",
                 "--image-size", "32", "--workers", "1"]) == 0
    assert main(["extract", "--data", str(data / "train.csv"), "--out", str(data / "banks"), "--workers", "0",
                 "--batch-size", "16", "--no-progress"]) == 0
    assert main(["neighbors", "--banks", str(data / "banks"), "--k", "4", "--no-progress"]) == 0
    return root


@pytest.mark.floor
def test_every_stage_runs_from_the_command_line(pipeline, capsys):
    data = pipeline / "data"
    runs = []
    for method in ("clip", "clip-ping"):
        run = pipeline / method
        runs.append(run)
        code, _, err = _run(capsys, "train", "--data", data, "--out", run, "--method", method, "--steps", 3,
                            "--batch-size", 8, "--workers", 0, "--no-progress", "--no-tensorboard", "--log-every", 1)
        assert code == 0, err
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 3
        assert ("loss_nn" in metrics[0]) == (method == "clip-ping")
        code, _, err = _run(capsys, "eval", "--checkpoint", run, "--data", data, "--workers", 0, "--no-progress",
                            "--no-linear-probe")
        assert code == 0, err
        result = json.loads((run / "eval.json").read_text())
        assert set(result["zeroshot"]) == {"shape", "color", "count"}
        assert 0 <= result["retrieval"]["image_to_text"]["R@1"] <= 100
    code, _, err = _run(capsys, "report", *runs, "--out", pipeline / "report")
    assert code == 0, err
    assert (pipeline / "report" / "report.md").is_file() and (pipeline / "report" / "index.html").is_file()
    code, _, err = _run(capsys, "export", "--checkpoint", runs[1], "--out", pipeline / "export")
    assert code == 0, err
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{pipeline / 'export'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{pipeline / 'export'}")(["a red circle"])
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(next((data / "images").rglob("*.png")))).unsqueeze(0))
        text = model.encode_text(tokens)
    assert image.shape == text.shape == (1, model.text_projection.shape[1]) and torch.isfinite(image).all()


@pytest.mark.parametrize("variant", [["--neighbor-topk", "3", "--head", "mlp", "--logit-scales", "per_term"],
                                     ["--neighbor-source", "queue", "--queue-size", "16"],
                                     ["--neighbor-source", "queue", "--targets", "student"]])
def test_method_variants_train(pipeline, capsys, variant):
    run = pipeline / ("variant-" + "-".join(v.strip("-") for v in variant))
    code, _, err = _run(capsys, "train", "--data", pipeline / "data", "--out", run, "--steps", 2, "--batch-size", 8,
                        "--workers", 0, "--no-progress", "--no-tensorboard", "--log-every", 1, *variant)
    assert code == 0, err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["loss_nn"] > 0 and last["loss_xnn"] > 0


def test_help_of_every_stage(capsys):
    # each stage's help lists that stage's own flags (built only for the command named)
    for argv, flag in ((["--help"], "demo"), (["train", "--help"], "--lambda-nn"), (["extract", "--help"], "--image-teacher"),
                       (["neighbors", "--help"], "--banks"), (["neighbors", "show", "--help"], "--out"),
                       (["eval", "--help"], "--checkpoint"), (["data", "synth", "--help"], "--n-train"),
                       (["-v", "demo", "--help"], "--teacher-image-size"), (["report", "--help"], "--names")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: clip-ping" in out and flag in out, argv


def test_the_command_named_on_the_line_is_found():
    assert requested_command([]) == ()
    assert requested_command(["--help"]) == ()
    assert requested_command(["-v", "train", "--method", "clip", "--data", "d"]) == ("train",)
    assert requested_command(["neighbors", "show", "--banks", "b"]) == ("neighbors", "show")
    assert requested_command(["neighbors", "--banks", "show"]) == ("neighbors",)
    assert requested_command(["data", "synth"]) == ("data", "synth")
    assert requested_command(["data"]) == ("data",)
    assert requested_command(["trian", "--help"]) == ("trian",)


def test_top_level_help_does_not_import_torch():
    """`clip-ping --help` is a new user's first command: it lists the commands without loading torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom clip_ping.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: clip-ping" in done.stdout and "train" in done.stdout
    assert done.stdout.strip().endswith("torch not imported"), done.stdout[-300:] + done.stderr[-1000:]


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_config_key_in_yaml_is_named(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("batch_size: 8\nlearning_rate: 0.1\n")
    code, _, err = _run(capsys, "train", "--config", cfg)
    _assert_one_line_error(code, err, "learning_rate")


def test_unknown_teacher_is_refused(tiny_synth, tmp_path, capsys):
    code, _, err = _run(capsys, "extract", "--data", tiny_synth / "train.csv", "--out", tmp_path / "b",
                        "--image-teacher", "resnet-9000", "--no-progress")
    _assert_one_line_error(code, err, "resnet-9000")


def test_bank_of_another_data_set_is_refused(pipeline, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(pipeline / "data", other, ignore=shutil.ignore_patterns("banks"))
    (other / "train.csv").write_text((other / "train.csv").read_text().replace("a ", "one ", 1))
    code, _, err = _run(capsys, "train", "--data", other, "--banks", pipeline / "data" / "banks", "--steps", 1,
                        "--batch-size", 8, "--workers", 0, "--no-progress", "--out", tmp_path / "run")
    _assert_one_line_error(code, err, "another data set")


def test_missing_image_and_empty_caption_are_skipped_and_counted(tiny_synth, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    lines = (data / "train.csv").read_text().splitlines()
    first = lines[1].split(",", 1)
    lines[1] = "images/train/missing.png," + first[1]
    second = lines[2].split(",")
    lines[2] = ",".join([second[0], '""'] + second[-3:])
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, "train", "--data", data, "--method", "clip", "--steps", 1, "--batch-size", 8,
                        "--workers", 0, "--no-progress", "--no-tensorboard", "--out", tmp_path / "run")
    assert code == 0, err
    from clip_ping.data.csv_reader import read_pairs

    table = read_pairs(data / "train.csv")
    assert len(table) == 46 and sum(table.skipped.values()) == 2


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--data", tmp_path / "nope", "--out", tmp_path / "run")
    _assert_one_line_error(code, err, "nope")
