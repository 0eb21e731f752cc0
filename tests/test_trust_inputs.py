"""Inputs that must never mix up a pair or change a run behind the user's back, class by class.

Each table row is a case a hostile user tried: a reordered shard, a resume with other settings,
a re-run over finished work with other options, a data folder that is not what it looks like, a
number out of its range, a torn metrics line. Run as a user would (the CLI's `main`), each ends
with exit code 2 and one line naming the thing, or is handled (and recorded) as it should be.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import one_error_line as _one_line  # noqa: E402
from conftest import run_cli as _run  # noqa: E402

from clip_ping.cli import COMMANDS, main
from clip_ping.config import Config, numeric_fields
from clip_ping.errors import ConfigError
from clip_ping.training.checkpoints import load_checkpoint
from clip_ping.training.train_config import RESUME_FIXED, RESUME_INVOCATION, RESUME_MAY_CHANGE, TrainConfig

TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--no-tensorboard",
         "--method", "clip", "--log-every", "1"]








@pytest.fixture(scope="module")
def finished_run(tiny_synth, tmp_path_factory) -> Path:
    """A 2-step run (checkpoint at step 2), trained once; each test copies it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([str(a) for a in (*TRAIN, "--data", tiny_synth, "--out", run)]) == 0
    return run


@pytest.fixture()
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# --------------------------------------------------------------------------- numbers out of range

BAD_NUMBERS = [
    (["--beta1", "2"], "'beta1' must be in [0, 1), got 2.0"),
    (["--beta2", "nan"], "'beta2' must be a finite number, got nan"),
    (["--eps", "-1"], "'eps' must be > 0, got -1.0"),
    (["--grad-clip", "-1"], "'grad_clip' must be >= 0, got -1.0"),
    (["--grad-clip", "nan"], "'grad_clip' must be a finite number"),
    (["--weight-decay", "-1"], "'weight_decay' must be >= 0"),
    (["--shuffle-buffer", "-1"], "'shuffle_buffer' must be >= 0"),
    (["--min-lr", "nan"], "'min_lr' must be a finite number"),
    (["--min-lr", "0.5"], "'min_lr': 0.5 is above the peak rate lr 0.001"),
    (["--lr", "inf"], "'lr' must be a finite number"),
    (["--lambda-nn", "-1", "--method", "clip-ping"], "'lambda_nn' must be >= 0"),
    (["--peer-temperature", "0"], "'peer_temperature' must be > 0"),
    (["--image-cache-gb", "nan"], "'image_cache_gb' must be a finite number"),
    (["--seed", "-1"], "'seed' must be in [0, 4294967295]"),
    (["--teacher-image-size", "60000"], "'teacher_image_size' must be in [16, 2048]"),
]


@pytest.mark.parametrize("flags,says", BAD_NUMBERS, ids=[" ".join(f) for f, _ in BAD_NUMBERS])
def test_a_training_number_out_of_range_is_one_line(data, tmp_path, capsys, flags, says):
    code, err = _run(capsys, *TRAIN, "--data", data, "--out", tmp_path / "run", *flags)
    assert code == 2 and says in _one_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


OTHER_COMMANDS = [
    (["data", "synth", "--out", "{tmp}/s", "--image-size", "60000"], "'image_size' must be in [16, 4096], got 60000"),
    (["data", "synth", "--out", "{tmp}/s", "--n-train", "nan"], "'n_train': cannot read 'nan' as int"),
    (["data", "openclipart", "--out", "{tmp}/o", "--val-fraction", "nan"], "'val_fraction' must be a finite number"),
    (["extract", "--data", "{tmp}", "--out", "{tmp}/b", "--teacher-image-size", "99999"], "'teacher_image_size' must be in"),
    (["extract", "--data", "{tmp}", "--out", "{tmp}/b", "--chunk-size", "0"], "'chunk_size' must be >= 1"),
    (["neighbors", "--banks", "{tmp}", "--k", "0"], "'k' must be >= 1"),
    (["neighbors", "show", "--data", "{tmp}", "--thumb", "100000"], "'thumb' must be in [16, 1024]"),
    (["eval", "--checkpoint", "{tmp}", "--probe-cs", "1", "nan"], "'probe_cs' must be a finite number"),
    (["eval", "--checkpoint", "{tmp}", "--batch-size", "-4"], "'batch_size' must be >= 1"),
    (["demo", "--out", "{tmp}/d", "--lr", "nan"], "'lr' must be a finite number"),
    (["demo", "--out", "{tmp}/d", "--image-size", "60000"], "'image_size' must be in [16, 4096]"),
    (["demo", "--out", "{tmp}/d", "--seeds", "0", "-2"], "'seeds' must be in [0, 4294967295], got -2"),
]


@pytest.mark.parametrize("argv,says", OTHER_COMMANDS, ids=[" ".join(a[:2]) + " " + a[-1] for a, _ in OTHER_COMMANDS])
def test_every_commands_numbers_are_checked_with_one_line(tmp_path, capsys, argv, says):
    code, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and says in _one_line(err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()


def _config_classes() -> list[type]:
    classes = []
    for command in COMMANDS:
        module, name = command.config.split(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def test_every_number_of_every_command_declares_its_bounds():
    """A new int or float option must say which values it takes (option(..., bounds=...))."""
    missing = [f"{cls.__name__}.{f.name}" for cls in _config_classes() for f in numeric_fields(cls)
               if "bounds" not in f.metadata]
    assert missing == []
    assert all(issubclass(cls, Config) for cls in _config_classes())  # so each is checked when made, in code too


# --------------------------------------------------------------------------- resume with other settings


def test_every_training_setting_has_one_resume_rule():
    groups = (RESUME_FIXED, RESUME_MAY_CHANGE, RESUME_INVOCATION)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(n for g in groups for n in g) == sorted(names)  # each field once, none left out


ARITHMETIC = [
    (["--lr", "0.002"], "--lr 0.001 -> 0.002"),
    (["--batch-size", "4"], "--batch-size 8 -> 4"),
    (["--seed", "1"], "--seed 0 -> 1"),
    (["--weight-decay", "0.2"], "--weight-decay 0.1 -> 0.2"),
    (["--warmup-steps", "3"], "--warmup-steps 50 -> 3"),
    (["--beta2", "0.9"], "--beta2 0.98 -> 0.9"),
    (["--grad-clip", "none"], "--grad-clip 1.0 -> None"),
    (["--precision", "bf16"], "--precision fp32 -> bf16"),
    (["--duplicate-captions", "mask"], "--duplicate-captions none -> mask"),
    (["--lr", "0.002", "--seed", "1"], "--lr 0.001 -> 0.002, --seed 0 -> 1"),
]


@pytest.mark.parametrize("flags,says", ARITHMETIC, ids=[" ".join(f) for f, _ in ARITHMETIC])
def test_resuming_with_a_setting_that_changes_the_arithmetic_is_refused(run, tiny_synth, capsys, flags, says):
    config_before = (run / "config.yaml").read_bytes()
    latest_before = (run / "checkpoints" / "latest.pt").read_bytes()
    code, err = _run(capsys, *TRAIN, "--data", tiny_synth, "--out", run, "--resume", "latest", "--steps", "4", *flags)
    line = _one_line(err)
    assert code == 2 and says in line and "--resume" in line
    assert (run / "config.yaml").read_bytes() == config_before  # never rewritten as if the run had used them
    assert (run / "checkpoints" / "latest.pt").read_bytes() == latest_before
    assert not (run / "run_history.jsonl").exists()


def test_resuming_with_settings_that_may_change_records_them_with_their_step(run, tiny_synth, capsys):
    code, err = _run(capsys, *TRAIN, "--data", tiny_synth, "--out", run, "--resume", "latest", "--steps", "3",
                     "--log-every", "3", "--keep-checkpoints", "1")
    assert code == 0, err
    history = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] == 2
    assert history[0]["changed"] == {"steps": {"from": 2, "to": 3}, "log_every": {"from": 1, "to": 3},
                                     "keep_checkpoints": {"from": 2, "to": 1}}
    text = (run / "config.yaml").read_text()
    assert text.startswith("# the settings in force now; run_history.jsonl")
    assert yaml.safe_load(text)["steps"] == 3 and load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 3
    # the same settings again change nothing more
    assert _run(capsys, "train", "--config", run / "config.yaml", "--resume", "latest")[0] == 0
    assert len((run / "run_history.jsonl").read_text().splitlines()) == 1


TORN = ['{"step": 3, "loss": 1.2', '{"step": 3, "lo', "\x00\x00\x00"]


@pytest.mark.parametrize("torn", TORN, ids=["cut-number", "cut-key", "nul-bytes"])
def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(run, tiny_synth, capsys, caplog, torn):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(torn)  # the process died mid-write: no newline
    code, err = _run(capsys, *TRAIN, "--data", tiny_synth, "--out", run, "--resume", "latest", "--steps", "3")
    assert code == 0, err
    assert "last line is cut short" in caplog.text
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_one_line(run, tiny_synth, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("not json\n" + "".join(lines))
    code, err = _run(capsys, *TRAIN, "--data", tiny_synth, "--out", run, "--resume", "latest", "--steps", "3")
    assert code == 2 and "metrics.jsonl line 1 is not a JSON record" in _one_line(err)


# --------------------------------------------------------------------------- a stale shard index


def _shards(data: Path, out: Path) -> Path:
    from clip_ping.data.convert import write_shards
    from clip_ping.data.csv_reader import read_pairs

    write_shards(read_pairs(data / "train.csv"), out, samples_per_shard=16)
    return out


def _reorder(tar_path: Path) -> None:
    """Rewrite a tar with its samples in reverse order: the same members, hence the same size."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    samples: dict[str, list] = {}
    for m, payload in members:
        samples.setdefault(m.name.split(".")[0], []).append((m, payload))
    size = tar_path.stat().st_size
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in reversed(list(samples)):
            for m, payload in samples[key]:
                tar.addfile(m, io.BytesIO(payload))
    assert tar_path.stat().st_size == size


def _reorder_keeping_its_time(tar_path: Path) -> None:
    """As `cp -p` or `rsync -t` of a rewritten shard: the same size and modification time."""
    st = tar_path.stat()
    _reorder(tar_path)
    os.utime(tar_path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _rewrite_same(tar_path: Path) -> None:
    tar_path.write_bytes(tar_path.read_bytes())  # a new modification time, the same bytes


def _cut(tar_path: Path) -> None:
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])


def _copy_folder(tar_path: Path) -> None:
    folder = tar_path.parent
    moved = folder.with_name("moved")
    shutil.copytree(folder, moved)  # copy2 keeps times: make them new, as `cp` without -p does
    for p in moved.glob("*.tar"):
        p.write_bytes(p.read_bytes())
    shutil.rmtree(folder)
    moved.rename(folder)


SHARD_CHANGES = [
    (_reorder, "its members are not where the index says"),
    (_reorder_keeping_its_time, "the tar has train-"),
    (_cut, "bytes then"),
    (_rewrite_same, None),  # same members: accepted
    (_copy_folder, None),
]


@pytest.mark.parametrize("change,says", SHARD_CHANGES, ids=[c.__name__.strip("_") for c, _ in SHARD_CHANGES])
def test_a_shard_changed_since_indexing_is_refused_naming_it(data, tmp_path, capsys, change, says):
    from clip_ping.data.table import open_table

    shards = _shards(data, tmp_path / "shards")
    before = open_table(shards)
    target = shards / "train-000001.tar"
    change(target)
    code, err = _run(capsys, *TRAIN, "--data", shards, "--out", tmp_path / "run", "--steps", "1")
    if says is None:
        assert code == 0, err
        after = open_table(shards)
        assert [after.read_image_bytes(i) for i in range(len(after))] == \
               [before.read_image_bytes(i) for i in range(len(before))]
    else:
        line = _one_line(err)
        assert code == 2 and says in line and str(target) in line and "re-index: clip-ping data convert --to index" in line


# --------------------------------------------------------------------------- reusing finished work


def test_data_synth_over_a_data_set_of_other_options_names_them(tmp_path, capsys):
    small = ["data", "synth", "--out", tmp_path / "s", "--n-train", "4", "--n-val", "1", "--n-test", "1",
             "--image-size", "16", "--workers", "1"]
    assert _run(capsys, *small)[0] == 0
    assert _run(capsys, *small)[0] == 0  # the same options: kept
    code, err = _run(capsys, *small, "--seed", "1")
    assert code == 2 and "--seed 0 -> 1" in _one_line(err)


DEMO_CHANGES = [(["--lr", "0.01"], "--lr 0.001 -> 0.01"), (["--epochs", "9"], "--epochs 6 -> 9"),
                (["--seeds", "0"], "--seeds [0, 1] -> [0]"), (["--n-train", "100"], "--n-train 4000 -> 100")]


@pytest.mark.parametrize("flags,says", DEMO_CHANGES, ids=[f[0] for f, _ in DEMO_CHANGES])
def test_a_demo_over_a_demo_of_other_options_is_refused_before_any_work(tmp_path, capsys, flags, says):
    from clip_ping.demo import DemoConfig, check_demo_folder

    out = tmp_path / "demo"
    check_demo_folder(DemoConfig(out=str(out)))  # what the first demo in this folder recorded
    code, err = _run(capsys, "demo", "--out", out, *flags)
    assert code == 2 and says in _one_line(err) and str(out) in _one_line(err)
    assert sorted(p.name for p in out.iterdir()) == [".clip-ping.json", "demo.json"]  # its marker, its record
    check_demo_folder(DemoConfig(out=str(out), workers=0, progress=False, jobs=1))  # speed options may differ


def test_a_demo_run_evaluated_with_other_settings_is_not_shown_as_this_demos(finished_run, tiny_synth, tmp_path):
    """A demo folder older than demo.json: the finished run's own config.yaml is compared."""
    from clip_ping.demo import train_and_evaluate

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "eval.json").write_text("{}")
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    same = TrainConfig(**{**recorded, "out": str(run), "resume": "auto", "workers": 0})
    assert train_and_evaluate(same, tiny_synth, 0) == {}  # reused: the same run
    with pytest.raises(ConfigError, match=r"holds a finished run of other settings \(--lr 0.001 -> 0.01\)"):
        train_and_evaluate(dataclasses.replace(same, lr=0.01), tiny_synth, 0)
    with pytest.raises(ConfigError, match=r"--steps 2 -> 5"):
        train_and_evaluate(dataclasses.replace(same, steps=5), tiny_synth, 0)


# --------------------------------------------------------------------------- a data folder that is not what it looks like


def _pairs_beside_image_folders(data: Path) -> Path:
    """train_pairs.csv beside two folders of images, as a user lays out a data set by hand."""
    folder = data.parent / "by_hand"
    (folder / "images").mkdir(parents=True)
    (folder / "thumbs").mkdir()
    rows = (data / "train.csv").read_text().splitlines()
    for row in rows[1:]:
        name = Path(row.split(",")[0]).name
        shutil.copy(data / row.split(",")[0], folder / "images" / name)
        shutil.copy(data / row.split(",")[0], folder / "thumbs" / name)
    (folder / "train_pairs.csv").write_text("\n".join(rows).replace("images/train/", "images/") + "\n")
    return folder


def _labels_csv_beside_class_folders(data: Path) -> Path:
    folder = _pairs_beside_image_folders(data)
    (folder / "train_pairs.csv").rename(folder / "labels.tsv")
    return folder


LOOKALIKES = [(_pairs_beside_image_folders, "train_pairs.csv"), (_labels_csv_beside_class_folders, "labels.tsv")]


@pytest.mark.parametrize("make,names", LOOKALIKES, ids=[m.__name__.strip("_") for m, _ in LOOKALIKES])
def test_a_folder_of_tables_beside_sub_folders_is_not_read_as_class_folders(data, tmp_path, capsys, make, names):
    folder = make(data)
    code, err = _run(capsys, *TRAIN, "--data", folder, "--out", tmp_path / "run")
    line = _one_line(err)
    assert code == 2 and "matches no layout for split 'train'" in line and names in line
    assert "train.csv/train.tsv: none" in line and "train.shards.json: none" in line and "--data" in line
    code, err = _run(capsys, *TRAIN, "--data", folder / "train_pairs.csv", "--out", tmp_path / "run2") \
        if (folder / "train_pairs.csv").exists() else (0, "")
    assert code == 0, err  # the table itself, named, is read


# --------------------------------------------------------------------------- eval that quietly scores less


def _wds_shards(root: Path, n: int = 12, n_shards: int = 2) -> Path:
    """clip_benchmark's layout: ROOT/test/{0,1}.tar (png + cls), nshards.txt, classnames.txt."""
    from PIL import Image

    (root / "test").mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in range(s, n, n_shards):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (40 * (i % 4), 90, 200)).save(buf, format="PNG")
                for name, payload in ((f"s{i:05d}.png", buf.getvalue()), (f"s{i:05d}.cls", str(i % 4).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text(str(n_shards))
    (root / "classnames.txt").write_text("red\ngreen\nblue\nyellow\n")
    return root


def _cut_in_a_member(tar: Path) -> None:
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])


def _cut_at_a_header(tar: Path) -> None:
    with tarfile.open(tar) as tf:
        third = [m for m in tf][4]  # the header of the third sample's image
    tar.write_bytes(tar.read_bytes()[: third.offset])


CUTS = [(_cut_in_a_member, "cut short"), (_cut_at_a_header, "cut short")]


@pytest.mark.parametrize("cut,says", CUTS, ids=[c.__name__.strip("_") for c, _ in CUTS])
def test_a_cut_eval_shard_is_recorded_and_printed_never_a_traceback(tiny_model, tmp_path, caplog, cut, says):
    from clip_ping.evaluation.layouts import read_wds
    from clip_ping.evaluation.suite import _Encoder, zeroshot_task

    model, tokenizer, preprocess = tiny_model
    root = _wds_shards(tmp_path / "wds")
    cut(root / "test" / "1.tar")
    data = read_wds(root, "test")
    result = zeroshot_task(_Encoder(model, tokenizer, preprocess, workers=0, progress=False), data, "colors")
    found = result["coverage"]
    assert found["scored"] == result["n"] == len(data.images) < 12
    assert "1.tar" in found["note"] and "not read" in found["note"]
    assert "task 'colors': scored" in caplog.text and "1.tar" in caplog.text


def test_class_names_that_leave_labels_out_are_counted_and_printed(tiny_model, tiny_synth, caplog):
    from clip_ping.evaluation.runner import evaluate

    model, tokenizer, preprocess = tiny_model
    info = json.loads((tiny_synth / "dataset.json").read_text())
    shape = info["tasks"]["shape"]
    kept = shape["classes"][:2]  # the other shapes' images have a label outside the task's classes
    tasks = {"shape": {**shape, "classes": kept}}
    result = evaluate(model, tokenizer, preprocess, tiny_synth, "test", tasks=tasks, workers=0, progress=False)
    scores = result["zeroshot"]["shape"]
    found = scores["coverage"]
    labels = [row.split(",")[-3] for row in (tiny_synth / "test.csv").read_text().splitlines()[1:]]
    outside = sum(label not in kept for label in labels)
    assert outside > 0 and found == {"rows": 16, "scored": 16 - outside,
                                     "not_scored": {"label_not_among_the_task_classes": outside}}
    assert scores["n"] == found["scored"]
    assert f"zero-shot task 'shape': scored {16 - outside} of 16 rows" in caplog.text
