"""A careless or unlucky user's inputs, table by table: each gets one clear line and exit code 2, or a
counted skip with every other row still paired with its own caption. None shows a traceback, none
loses work or mis-pairs a row. The regression tests of the five silent failures are at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_error_line as _one_clear_line  # noqa: E402

from clip_ping.cli import main
from clip_ping.data.csv_reader import read_pairs
from clip_ping.training.checkpoints import load_checkpoint

TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--no-tensorboard",
         "--method", "clip", "--log-every", "1"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err






BAD_VALUES = [
    (["--lr", "nan"], "'lr'"), (["--lr", "inf"], "'lr'"), (["--lr", "0"], "'lr'"),
    (["--save-every", "0"], "'save_every'"), (["--log-every", "0"], "'log_every'"),
    (["--workers", "-1"], "'workers'"), (["--threads", "-3"], "'threads'"), (["--warmup-steps", "-5"], "'warmup_steps'"),
    (["--keep-checkpoints", "-1"], "'keep_checkpoints'"), (["--device", "foo"], "'device'"),
    (["--device", "cuda"], "no CUDA GPU"), (["--batch-size", "1"], "'batch_size'"), (["--method", "nope"], "invalid choice"),
    (["--max-skipped-fraction", "2"], "'max_skipped_fraction'"), (["--resume", "latest", "--overwrite"], "contradict"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
]


@pytest.mark.parametrize("flags,says", BAD_VALUES, ids=[" ".join(f) for f, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_and_exit_2(data, tmp_path, capsys, monkeypatch, flags, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", *flags)
    except SystemExit as exc:  # argparse's own errors (unknown flag, bad choice)
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_yaml_and_an_unknown_key_are_one_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--config", bad)
    assert code == 2 and "not valid YAML" in _one_clear_line(err)
    typo = tmp_path / "typo.yaml"
    typo.write_text("learning_rate: 0.1\n")
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--config", typo)
    assert code == 2 and "unknown config key 'learning_rate'" in _one_clear_line(err)


def test_an_output_folder_that_cannot_be_written_is_one_line(data, capsys):
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", "/proc/clip-ping-run")
    assert code == 2 and "run folder" in _one_clear_line(err)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(data, tmp_path, capsys, monkeypatch):
    import errno

    import clip_ping.io as io

    def no_space(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "No space left on device" in _one_clear_line(err)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "a temporary file was left behind"
    assert io.remove_stale_temporaries(tmp_path / "run" / "checkpoints") == 0


def test_a_stale_temporary_of_a_killed_save_is_removed_at_the_next_save(data, tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run")[0] == 0
    (checkpoints / ".step_0000002.pt.tmp4242").write_bytes(b"half a checkpoint")
    assert _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", "--resume", "latest", "--steps", "3")[0] == 0
    assert not list(checkpoints.glob(".*"))


# --------------------------------------------------------------------------- data that already works


def _write_csv(folder: Path, lines: list[str]) -> Path:
    (folder / "pairs.csv").write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    return folder / "pairs.csv"


@pytest.mark.parametrize("case,line,reason", [
    ("missing file", "nowhere.png,a caption", "missing_image"),
    ("empty caption", "{ok},", "empty_caption"),
    ("whitespace caption", "{ok},   ", "empty_caption"),
    ("too many columns", "{ok},a caption,extra", "malformed_line"),
    ("too few columns", "{ok}", "malformed_line"),
    ("not UTF-8", "{ok},caf\udce9", "bad_encoding"),
    ("unclosed quote", '{ok},"an open quote, never closed', "malformed_line"),
])
def test_a_bad_row_is_counted_and_its_neighbours_stay_paired(tmp_path, case, line, reason):
    from PIL import Image

    for name in ("a", "b", "ok"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    path = _write_csv(tmp_path, ["filepath,caption", "a.png,first", line.format(ok="ok.png"), "b.png,last"])
    table = read_pairs(path)
    assert table.skipped == {reason: 1}, case
    assert [Path(p).name for p in table.filepaths] == ["a.png", "b.png"] and table.captions == ["first", "last"]


def test_a_table_without_header_is_one_line(tmp_path, capsys):
    path = _write_csv(tmp_path, ["a.png,a caption"])
    code, _, err = _run(capsys, *TRAIN, "--data", path, "--out", tmp_path / "run")
    assert code == 2 and "no image column 'filepath'" in _one_clear_line(err)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"not an image at all"],
                         ids=["zero bytes", "truncated", "not an image"])
def test_an_undecodable_image_is_counted_and_training_goes_on(data, tmp_path, capsys, content):
    rows = (data / "train.csv").read_text().splitlines()
    (data / rows[3].split(",")[0]).write_bytes(content)
    code, out, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", "--steps", "6")
    assert code == 0, err
    assert json.loads(out)["skipped_images"] == 1


def test_a_bank_of_other_data_and_an_edited_table_are_refused(tiny_banked, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_banked, data)
    lines = (data / "train.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",", ",edited ", 1)  # a caption changed after the bank was built
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", "--method", "clip-ping")
    assert code == 2 and "another data set" in _one_clear_line(err)


# --------------------------------------------------------------------------- the five silent failures


def test_silent_1_a_diverged_run_never_writes_a_non_finite_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", run, "--steps", "60", "--lr", "100",
                        "--weight-decay", "1", "--warmup-steps", "1", "--save-every", "1", "--keep-checkpoints", "1")
    assert code == 2 and "NaN or infinite" in err or "loss became" in err
    for path in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path.name
    if not (run / "checkpoints" / "latest.pt").exists():
        assert "no checkpoint was written" in err
    else:
        assert str(run / "checkpoints" / "latest.pt") in err


def test_silent_2_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run)[0] == 0
    first = (run / "metrics.jsonl").read_text()
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", run, "--lr", "0.002")
    assert code == 2 and "already holds a run" in _one_clear_line(err)
    assert (run / "metrics.jsonl").read_text() == first and load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 2
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", run, "--lr", "0.002", "--overwrite", "--steps", "3")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_silent_3_resume_continues_the_folder_its_config_lives_in(data, tmp_path, capsys, monkeypatch):
    original = tmp_path / "original"
    assert _run(capsys, *TRAIN, "--data", data, "--out", original, "--steps", "4", "--save-every", "2")[0] == 0
    before = (original / "checkpoints" / "latest.pt").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    monkeypatch.chdir(tmp_path / "data")  # another directory
    code, _, err = _run(capsys, "train", "--config", copy / "config.yaml", "--resume", "latest", "--steps", "6")
    assert code == 0, err
    assert load_checkpoint(copy / "checkpoints" / "latest.pt")["step"] == 6
    assert (original / "checkpoints" / "latest.pt").read_bytes() == before  # the original run is untouched
    assert (original / "checkpoints" / "step_0000004.pt").exists()
    empty = tmp_path / "empty"
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", empty, "--resume", "latest")
    assert code == 2 and str(empty / "checkpoints" / "latest.pt") in _one_clear_line(err)


def test_silent_3b_metrics_after_the_checkpoint_are_not_repeated_on_resume(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--steps", "5", "--save-every", "3",
                "--keep-checkpoints", "0")[0] == 0
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    state["step"], state["batch_in_epoch"] = 3, 3  # as if killed after the step-3 checkpoint
    torch.save(state, run / "checkpoints" / "latest.pt")
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--steps", "5", "--resume", "latest",
                "--keep-checkpoints", "0")[0] == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert not list((run / "checkpoints").glob("step_*.pt"))  # --keep-checkpoints 0: latest.pt only


def test_silent_5_too_many_undecodable_images_stop_the_run(data, tmp_path, capsys):
    rows = (data / "train.csv").read_text().splitlines()[1:]
    for row in rows[: int(len(rows) * 0.9)]:
        (data / row.split(",")[0]).write_bytes(b"broken")
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "could not be decoded" in _one_clear_line(err)
    for row in rows:
        (data / row.split(",")[0]).write_bytes(b"broken")
    code, _, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run2", "--max-skipped-fraction", "1")
    assert code == 2 and "no step could be trained" in _one_clear_line(err)


def test_export_refuses_a_file_and_another_export_and_a_nan_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run)[0] == 0
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = _run(capsys, "export", "--checkpoint", run, "--out", a_file)
    assert code == 2 and "is a file" in _one_clear_line(err)
    assert _run(capsys, "export", "--checkpoint", run, "--out", tmp_path / "export")[0] == 0
    code, _, err = _run(capsys, "export", "--checkpoint", run, "--out", tmp_path / "export")
    assert code == 2 and "already holds an exported model" in _one_clear_line(err)
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    for argv in (["export", "--checkpoint", tmp_path / "nan.pt", "--out", tmp_path / "nan-export"],
                 ["eval", "--checkpoint", tmp_path / "nan.pt", "--data", data, "--no-linear-probe", "--workers", "0",
                  "--no-progress"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "NaN or infinite" in _one_clear_line(err)


def test_a_decode_error_names_the_file_and_row_never_an_in_memory_buffer(tmp_path, caplog):
    from clip_ping.data.images import ImageDecodeError, load_image
    from clip_ping.data.pairs import PairDataset

    with pytest.raises(ImageDecodeError) as info:
        load_image(b"not an image", "train-000000.tar:000019")
    assert "train-000000.tar:000019" in str(info.value) and "BytesIO" not in str(info.value)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"broken")
    path = _write_csv(tmp_path, ["filepath,caption", "good.png,first", "bad.png,second"])
    dataset = PairDataset(read_pairs(path), lambda im: im)
    with caplog.at_level("WARNING"):
        assert dataset[1] is None
    assert "bad.png" in caplog.text and "row 2" in caplog.text


def test_an_image_replaced_by_another_of_the_same_size_is_caught_by_the_content_fingerprint(tmp_path):
    from PIL import Image

    from clip_ping.banks import check_table
    from clip_ping.data.pairs import data_fingerprint
    from clip_ping.errors import DataError

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.bmp")  # BMP: the size depends on the shape only
    path = _write_csv(tmp_path, ["filepath,caption", "a.bmp,red", "b.bmp,blue"])
    before = read_pairs(path)
    manifest = {"count": 2, "data_fingerprint": data_fingerprint(before, "content"), "data_fingerprint_kind": "content"}
    size_only = data_fingerprint(before)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "a.bmp")  # another picture, the same byte size
    after = read_pairs(path)
    assert data_fingerprint(after) == size_only  # the cheap default cannot see it
    with pytest.raises(DataError, match="another data set"):
        check_table(manifest, after, tmp_path)


def test_resuming_with_other_heads_names_the_setting_that_differs(tiny_banked, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", tiny_banked, "--out", run, "--method", "clip-ping"]
    assert _run(capsys, *TRAIN, *common)[0] == 0
    code, _, err = _run(capsys, *TRAIN, *common, "--resume", "latest", "--head", "linear", "--steps", "3")
    assert code == 2 and "--head mlp -> linear" in _one_clear_line(err)
