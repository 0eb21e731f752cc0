"""clip-ping never writes over or deletes a file it did not write, and a full disk, a second writer, a damaged
export input or a faulty evaluation layout is one line and exit code 2, case by case.

Every writing command is tried on a folder of the user's: it refuses in one line, and the user's file is
byte-identical afterwards. ``--overwrite`` removes only what clip-ping recorded writing. A folder being
written is locked (the second writer is named by PID). A full disk leaves the previous checkpoint or the
bank so far intact. Exports are moved into place whole, or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line as _one_line  # noqa: E402
from conftest import run_cli as _run  # noqa: E402

from clip_ping.errors import DataError
from clip_ping.io import MARKER, claim_folder

TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--no-tensorboard",
         "--method", "clip", "--log-every", "1", "--warmup-steps", "0"]
TINY_TEACHERS = ["--image-teacher", "test-tiny-image", "--text-teacher", "test-tiny-text"]






def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture()
def checkpoint(tiny_model, tmp_path) -> Path:
    """A run folder as training leaves it (an earlier clip-ping: no marker), with a tiny model's checkpoint."""
    from conftest import TINY_MODEL

    run = tmp_path / "ckpt-run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": tiny_model[0].state_dict(), "model_name": TINY_MODEL, "config": {"method": "clip"},
                "step": 2}, run / "checkpoints" / "latest.pt")
    (run / "eval.json").write_text(json.dumps({"checkpoint": str(run), "zeroshot": {"shape": {"top1": 40.0}}}))
    return run


def _bank_without_neighbours(data: Path) -> Path:
    """A bank as an earlier clip-ping leaves it (manifest, arrays; no marker), before its neighbours are built."""
    from clip_ping.data.table import open_table

    table = open_table(data, "train")
    n, rng, bank = len(table), np.random.default_rng(0), data / "banks"
    bank.mkdir()
    for name, d in (("image", 24), ("text", 16)):
        x = rng.standard_normal((n, d))
        np.save(bank / f"{name}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        np.save(bank / f"{name}_group.npy", np.arange(n, dtype=np.int64))
    np.save(bank / "valid.npy", np.ones(n, dtype=bool))
    (bank / "manifest.json").write_text(json.dumps({
        "count": n, "dims": {"image": 24, "text": 16}, "fingerprint": "random", "data_fingerprint": table.fingerprint(),
        "teachers": {"image": {"name": "test-tiny-image", "dim": 24}, "text": {"name": "test-tiny-text", "dim": 16}}}))
    return bank


# --------------------------------------------------------------------------- folders that are not clip-ping's

def _user_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


# (case, the user's files in the target folder, the command line ({out}, {data}, {ckpt}, {bank} filled in),
#  what the one line names)
NOT_OURS = [
    ("train --resume auto over an unrelated config.yaml", {"config.yaml": b"lr: 1\n# my notes\n"},
     [*TRAIN, "--data", "{data}", "--out", "{out}", "--resume", "auto"], "config.yaml"),
    ("train --overwrite over a folder with a checkpoints/ folder", {"checkpoints/mine.pt": b"my weights"},
     [*TRAIN, "--data", "{data}", "--out", "{out}", "--overwrite"], "checkpoints"),
    ("extract over the user's own image.npy/text.npy", {"image.npy": b"mine", "text.npy": b"mine too"},
     ["extract", "--data", "{data}", "--out", "{out}", *TINY_TEACHERS, "--no-progress"], "image.npy"),
    ("extract --overwrite over the user's files", {"image.npy": b"mine"},
     ["extract", "--data", "{data}", "--out", "{out}", *TINY_TEACHERS, "--no-progress", "--overwrite"], "image.npy"),
    ("data synth into a folder of the user's", {"notes.txt": b"mine"},
     ["data", "synth", "--out", "{out}", "--n-train", "4", "--n-val", "0", "--n-test", "0", "--image-size", "16"],
     "notes.txt"),
    ("data synth --overwrite into a folder of the user's", {"images/train/000000.png": b"my picture"},
     ["data", "synth", "--out", "{out}", "--n-train", "4", "--n-val", "0", "--n-test", "0", "--image-size", "16",
      "--overwrite"], "images"),
    ("data folders over another data set's test.csv and dataset.json",
     {"test.csv": b"filepath,caption\nx.png,a cat\n", "dataset.json": b'{"name": "theirs"}'},
     ["data", "folders", "--root", "{classes}", "--out", "{out}"], "test.csv"),
    ("data convert into a folder of the user's", {"train.csv": b"mine"},
     ["data", "convert", "--src", "{data}", "--out", "{out}", "--to", "shards", "--overwrite"], "train.csv"),
    ("data openclipart into a folder of the user's", {"dataset.json": b"mine"},
     ["data", "openclipart", "--root", "{clipart}", "--out", "{out}", "--overwrite"], "dataset.json"),
    ("eval over the user's results file", {"results.json": b'{"mine": 1}'},
     ["eval", "--checkpoint", "{ckpt}", "--data", "{data}", "--out", "{out}/results.json"], "results.json"),
    ("report over an existing index.html", {"index.html": b"<p>my page</p>"},
     ["report", "{runs}", "--out", "{out}"], "index.html"),
    ("export over a folder with the user's README.md", {"README.md": b"# my model\n"},
     ["export", "--checkpoint", "{ckpt}", "--out", "{out}"], "README.md"),
    ("export --overwrite over a folder with the user's README.md", {"README.md": b"# my model\n"},
     ["export", "--checkpoint", "{ckpt}", "--out", "{out}", "--overwrite"], "README.md"),
    ("neighbors show over the user's page", {"page.html": b"<p>mine</p>"},
     ["neighbors", "show", "--data", "{data}", "--banks", "{banked}/banks", "--out", "{out}/page.html"], "page.html"),
    ("demo into a folder of the user's", {"timings.json": b"mine"},
     ["demo", "--out", "{out}"], "timings.json"),
]


@pytest.mark.parametrize("case,files,argv,names", NOT_OURS, ids=[c[0] for c in NOT_OURS])
def test_a_command_refuses_a_folder_it_did_not_write(case, files, argv, names, data, checkpoint, tiny_banked,
                                                     tmp_path, capsys):
    out = _user_folder(tmp_path / "users", files)
    before = _snapshot(out)
    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        shutil.copy(data / "images" / "train" / "000000.png", classes / name / "a.png")
    clipart = tmp_path / "clipart"
    (clipart / "png").mkdir(parents=True)
    (clipart / "svg").mkdir()
    runs = tmp_path / "a-run"
    runs.mkdir()
    (runs / "config.yaml").write_text("method: clip\nseed: 0\n")
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    fill = {"out": out, "data": data, "ckpt": checkpoint, "classes": classes, "clipart": clipart, "runs": runs,
            "banked": tiny_banked}
    code, err = _run(capsys, *[a.format(**{k: str(v) for k, v in fill.items()}) for a in argv])
    line = _one_line(err)
    assert code == 2 and names in line and ("not write" in line or "not written" in line), line
    assert _snapshot(out) == before  # byte for byte; no file removed, none added but clip-ping's marker
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != MARKER]


def test_overwrite_removes_only_the_files_clip_ping_wrote(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--keep-checkpoints", "1")[0] == 0
    (run / "notes.txt").write_text("my notes")
    (run / "checkpoints" / "step_0000001.pt").write_bytes(b"my rollback copy")
    mine = {p: p.read_bytes() for p in (run / "notes.txt", run / "checkpoints" / "step_0000001.pt")}
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--overwrite", "--keep-checkpoints", "1")[0] == 0
    assert {p: p.read_bytes() for p in mine} == mine
    assert (run / "checkpoints" / "step_0000002.pt").is_file() and (run / "config.yaml").is_file()


def test_synth_overwrite_keeps_a_picture_the_user_put_in_its_folders(tmp_path, capsys):
    out = tmp_path / "synth"
    small = ["data", "synth", "--out", out, "--n-val", "1", "--n-test", "1", "--image-size", "16"]
    assert _run(capsys, *small, "--n-train", "4")[0] == 0
    (out / "images" / "train" / "my-picture.png").write_bytes(b"mine")
    assert _run(capsys, *small, "--n-train", "6", "--overwrite")[0] == 0
    assert (out / "images" / "train" / "my-picture.png").read_bytes() == b"mine"


def test_a_folder_of_an_earlier_clip_ping_stays_usable(data, tmp_path, capsys):
    """A run written before the marker existed resumes; a bank of then gets its neighbours."""
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--steps", "1")[0] == 0
    (run / MARKER).unlink()  # as an earlier clip-ping left it
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--resume", "latest")[0] == 0
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2
    bank = _bank_without_neighbours(data)
    assert _run(capsys, "neighbors", "--banks", bank, "--k", "2", "--method", "exact", "--no-progress")[0] == 0
    assert (bank / "neighbors.json").is_file()


def test_data_folders_adds_a_split_to_its_own_tables(data, tmp_path, capsys):
    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        shutil.copy(data / "images" / "train" / "000000.png", classes / name / "a.png")
    assert _run(capsys, "data", "folders", "--root", classes, "--split", "test")[0] == 0
    assert _run(capsys, "data", "folders", "--root", classes, "--split", "val")[0] == 0
    assert (classes / "test.csv").is_file() and (classes / "val.csv").is_file()


# --------------------------------------------------------------------------- checkpoint aliases

def test_latest_is_a_file_of_its_own_so_a_rollback_changes_nothing_else(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, *TRAIN, "--data", data, "--out", run, "--save-every", "1", "--keep-checkpoints", "2")[0] == 0
    checkpoints = run / "checkpoints"
    latest, newest = checkpoints / "latest.pt", checkpoints / "step_0000002.pt"
    assert latest.stat().st_nlink == 1 and not latest.is_symlink()
    assert latest.read_bytes() == newest.read_bytes()
    newest_bytes = newest.read_bytes()
    with open(latest, "wb") as f:  # a manual rollback, written in place
        f.write((checkpoints / "step_0000001.pt").read_bytes())
    assert newest.read_bytes() == newest_bytes


# --------------------------------------------------------------------------- two writers

HOLD = textwrap.dedent("""
    import sys, time
    from clip_ping.io import claim_folder
    claim = claim_folder(sys.argv[1], sys.argv[2], legacy=lambda folder: [], lock=True)
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("kind,argv", [
    ("run", [*TRAIN, "--data", "{data}", "--out", "{folder}", "--resume", "auto"]),
    ("bank", ["extract", "--data", "{data}", "--out", "{folder}", *TINY_TEACHERS, "--no-progress"]),
    ("neighbours", ["neighbors", "--banks", "{folder}", "--k", "2", "--method", "exact", "--no-progress"]),
], ids=["train", "extract", "neighbors"])
def test_a_second_writer_is_refused_with_the_holders_pid(kind, argv, data, tmp_path, capsys):
    folder = _bank_without_neighbours(data) if kind == "neighbours" else tmp_path / "folder"
    folder.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), kind], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(folder)
        code, err = _run(capsys, *[a.format(data=data, folder=folder) for a in argv])
        line = _one_line(err)
        assert code == 2 and f"PID {holder.pid}" in line, line
        assert {k: v for k, v in _snapshot(folder).items() if k != MARKER} == \
            {k: v for k, v in before.items() if k != MARKER}
    finally:
        holder.kill()
        holder.wait()
    if kind == "run":  # released by the system when its holder dies
        assert _run(capsys, *[a.format(data=data, folder=folder) for a in argv])[0] == 0


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(data, tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def fills_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the second checkpoint
            f.write(b"x" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from \
                OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    run = tmp_path / "run"
    code, err = _run(capsys, *TRAIN, "--data", data, "--out", run, "--save-every", "1")
    line = _one_line(err)
    latest = run / "checkpoints" / "latest.pt"
    assert code == 2 and "disk is full" in line and f"previous checkpoint {latest} is intact" in line, line
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(latest, weights_only=True)["step"] == 1
    assert not [p for p in latest.parent.iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_extracting_is_one_line_before_any_row(data, tmp_path, capsys, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    out = tmp_path / "bank"
    code, err = _run(capsys, "extract", "--data", data, "--out", out, *TINY_TEACHERS, "--no-progress")
    line = _one_line(err)
    assert code == 2 and "disk is full" in line and "image.npy" in line and "bank so far" in line, line
    assert not (out / "image.npy").exists() and not list(out.glob("*.tmp"))


def test_extraction_reserves_the_bank_on_disk(data, tmp_path, capsys, monkeypatch):
    """The memory maps are allocated when created (a sparse file written past a full disk dies of SIGBUS)."""
    reserved: list[int] = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (reserved.append(n), real(fd, off, n))[1])
    out = tmp_path / "bank"
    assert _run(capsys, "extract", "--data", data, "--out", out, *TINY_TEACHERS, "--no-progress")[0] == 0
    assert os.path.getsize(out / "image.npy") in reserved
    assert os.stat(out / "image.npy").st_blocks * 512 >= os.path.getsize(out / "image.npy") - 4096


# --------------------------------------------------------------------------- exports

def test_a_cut_or_foreign_eval_json_stops_the_export_before_any_write(checkpoint, tmp_path, capsys):
    for content, says in (('{"zeroshot": {"shape": {"top1": 4', "not valid JSON"),
                          ('{"linear_probe": {"shape": {"acc": 1}}}', "not an evaluation")):
        (checkpoint / "eval.json").write_text(content)
        out = tmp_path / "export"
        code, err = _run(capsys, "export", "--checkpoint", checkpoint, "--out", out)
        line = _one_line(err)
        assert code == 2 and says in line and "eval.json" in line, line
        assert not out.exists() and not list(tmp_path.glob(".export*"))


@pytest.mark.parametrize("command", ["export", "eval"])
def test_weights_that_do_not_fit_the_model_are_one_line(command, checkpoint, data, tmp_path, capsys):
    path = checkpoint / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.ndim == 2)
    state["model"][name] = state["model"][name][:, :-1]
    torch.save(state, path)
    extra = ["--out", tmp_path / "export"] if command == "export" else ["--data", data, "--out", tmp_path / "e.json"]
    code, err = _run(capsys, command, "--checkpoint", checkpoint, *extra)
    line = _one_line(err)
    assert code == 2 and name in line and "do not fit" in line, line


def test_a_failed_export_leaves_nothing_and_a_killed_ones_temporary_is_removed(checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    import clip_ping.hub.export as hub_export

    out = tmp_path / "export"

    def fails(folder):
        raise DataError("open_clip cannot load it")

    monkeypatch.setattr(hub_export, "verify_export", fails)
    code, err = _run(capsys, "export", "--checkpoint", checkpoint, "--out", out)
    assert code == 2 and "cannot load" in _one_line(err)
    assert list(tmp_path.iterdir()) == [checkpoint]  # no export, no temporary folder
    monkeypatch.undo()

    killed = claim_folder(tmp_path / ".export.export-tmp999999999", "export")  # as a kill -9 leaves it
    killed.file("open_clip_model.safetensors").write_bytes(b"x" * 1000)
    assert _run(capsys, "export", "--checkpoint", checkpoint, "--out", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.name, "export"])
    assert (out / "open_clip_config.json").is_file()
    assert _run(capsys, "export", "--checkpoint", checkpoint, "--out", out, "--overwrite")[0] == 0  # its own


def test_a_users_file_added_to_an_export_survives_its_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    assert _run(capsys, "export", "--checkpoint", checkpoint, "--out", out)[0] == 0
    (out / "NOTES.md").write_text("mine")
    assert _run(capsys, "export", "--checkpoint", checkpoint, "--out", out, "--overwrite")[0] == 0
    assert (out / "NOTES.md").read_text() == "mine" and (out / "open_clip_config.json").is_file()


# --------------------------------------------------------------------------- evaluation layouts

def _karpathy(tmp_path: Path, images: list) -> Path:
    (tmp_path / "a.jpg").write_bytes(b"")
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images}))
    return path


def _wds(tmp_path: Path, nshards: bytes = b"1", classnames: bytes = b"cat\ndog\n", caption: bytes | None = None,
         templates: bytes | None = None) -> Path:
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_bytes(nshards)
    (root / "classnames.txt").write_bytes(classnames)
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_bytes(templates)
    if caption is not None:
        (root / "dataset_type.txt").write_text("retrieval")
    with tarfile.open(root / "test" / "0.tar", "w") as tf:
        for name, content in (("s0.png", b"png"), ("s0.txt" if caption is not None else "s0.cls", caption or b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, __import__("io").BytesIO(content))
    return root


def _read_wds(root: Path):
    from clip_ping.evaluation.layouts import read_wds

    return read_wds(root, "test")


def _folders(tmp_path: Path, names: bytes, suffix: str):
    from clip_ping.evaluation.layouts import read_class_folders

    for c in ("cat", "dog"):
        (tmp_path / "f" / c).mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / c / "a.png").write_bytes(b"")
    names_file = tmp_path / f"names{suffix}"
    names_file.write_bytes(names)
    return lambda: read_class_folders(tmp_path / "f", None, classnames=str(names_file))


def _image_folder_names(tmp_path: Path, names: bytes):
    from clip_ping.data.folders import read_image_folder

    for c in ("cat", "dog"):
        (tmp_path / "g" / c).mkdir(parents=True, exist_ok=True)
        (tmp_path / "g" / c / "a.png").write_bytes(b"")
    (tmp_path / "names.json").write_bytes(names)
    return lambda: read_image_folder(tmp_path / "g", str(tmp_path / "names.json"))


def _karpathy_reader(images: list):
    from clip_ping.evaluation.layouts import read_karpathy_json

    return lambda tmp_path: (lambda: read_karpathy_json(_karpathy(tmp_path, images)))


LAYOUT_FAULTS = [
    ("karpathy entry without filename", _karpathy_reader([{"split": "test", "sentences": [{"raw": "a"}]}]),
     ["dataset_flickr30k.json", "images[0]", "'filename' is missing"]),
    ("karpathy string entries", _karpathy_reader(["a.jpg"]), ["dataset_flickr30k.json", "images[0]", "str"]),
    ("karpathy filepath null",
     _karpathy_reader([{"split": "test", "filename": "a.jpg", "filepath": None, "sentences": [{"raw": "a"}]}]),
     ["dataset_flickr30k.json", "images[0]", "'filepath' is null"]),
    ("karpathy sentences of strings",
     _karpathy_reader([{"split": "test", "filename": "a.jpg", "sentences": ["a dog"]}]),
     ["dataset_flickr30k.json", "images[0]", "sentences"]),
    ("nshards.txt holding a word", lambda p: (lambda: _read_wds(_wds(p, nshards=b"four\n"))),
     ["nshards.txt", "'four'"]),
    ("non-UTF-8 clip_benchmark class names", lambda p: (lambda: _read_wds(_wds(p, classnames=b"cat\ncaf\xe9\n"))),
     ["classnames.txt", "line 2", "UTF-8"]),
    ("non-UTF-8 templates",
     lambda p: (lambda: _read_wds(_wds(p, templates=b"a photo of a {c}.\n\xff {c}\n"))),
     ["zeroshot_classification_templates.txt", "line 2", "UTF-8"]),
    ("non-UTF-8 captions", lambda p: (lambda: _read_wds(_wds(p, caption=b"a \xe9t\xe9 picture"))),
     ["0.tar", "'s0'", "UTF-8"]),
    ("non-UTF-8 class names file", lambda p: _folders(p, b"cat\n\xe9dog\n", ".txt"), ["names.txt", "line 2", "UTF-8"]),
    ("invalid class-names JSON", lambda p: _folders(p, b'{"cat": "cat",', ".json"), ["names.json", "not valid JSON"]),
    ("mistyped class-names JSON", lambda p: _folders(p, b'{"cat": 3, "dog": "dog"}', ".json"),
     ["names.json", "entry 'cat'", "not a class name"]),
    ("class-names JSON that is a list", lambda p: _folders(p, b'["cat", "dog"]', ".json"), ["names.json", "list"]),
    ("eval --names-file mistyped JSON", lambda p: _image_folder_names(p, b'{"cat": ["a", "b"]}'),
     ["names.json", "entry 'cat'"]),
    ("eval --names-file not UTF-8", lambda p: _image_folder_names(p, b'{"cat": "caf\xe9"}'),
     ["names.json", "line 1", "UTF-8"]),
]


@pytest.mark.parametrize("case,make,says", LAYOUT_FAULTS, ids=[c[0] for c in LAYOUT_FAULTS])
def test_an_evaluation_layout_fault_is_one_line_naming_the_file_and_entry(case, make, says, tmp_path):
    read = make(tmp_path)
    with pytest.raises(DataError) as caught:
        read()
    message = str(caught.value)
    assert "\n" not in message and all(s in message for s in says), message


def _faulty_suite(tmp_path: Path) -> Path:
    root = _wds(tmp_path, nshards=b"four\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - name: wds\n    kind: zeroshot\n    layout: wds\n    path: {root}\n")
    return suite


def test_an_evaluation_layout_fault_reaches_the_user_as_one_line(checkpoint, tmp_path, capsys):
    code, err = _run(capsys, "eval", "--checkpoint", checkpoint, "--suite", _faulty_suite(tmp_path),
                     "--out", tmp_path / "s.json")
    line = _one_line(err)
    assert code == 2 and "nshards.txt" in line, line


def test_eval_never_asks_for_an_option_it_does_not_have(checkpoint, tmp_path, capsys):
    """``eval --suite --with-clip-benchmark`` exports into a folder of its own: run again, it replaces the
    export it wrote (it used to stop with "pass --overwrite", an option eval does not have)."""
    suite = _faulty_suite(tmp_path)
    for _ in range(2):
        code, err = _run(capsys, "eval", "--checkpoint", checkpoint, "--suite", suite, "--with-clip-benchmark",
                         "--out", tmp_path / "s.json")
        line = _one_line(err)
        assert code == 2 and "nshards.txt" in line and "--overwrite" not in line, line
    assert (tmp_path / "s-export" / "open_clip_config.json").is_file()


# --------------------------------------------------------------------------- a real full disk (a small tmpfs)

@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MiB tmpfs under tmp_path; skipped where the test may not mount one (it needs root)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC tests cover this")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fill the disk of ``folder`` until ``leave`` bytes are free."""
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))


CLI_WITH_TINY_TEACHERS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers the tiny test teachers
    from clip_ping.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_really_full_disk_while_extracting_is_one_line_not_a_bus_error(data, small_disk):
    _fill(small_disk, 8192)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CLI_WITH_TINY_TEACHERS, str(Path(__file__).parent), "extract",
                           "--data", str(data), "--out", str(small_disk / "bank"), *TINY_TEACHERS, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # not 135 (SIGBUS)
    line = _one_line(done.stderr)
    assert "disk is full" in line and "bank" in line, line


def test_a_really_full_disk_at_a_checkpoint_keeps_the_previous_one(data, small_disk, tiny_model, capsys):
    run = small_disk / "run"
    common = [*TRAIN, "--data", data, "--out", run, "--keep-checkpoints", "0", "--model", "clip-ping-test-tiny"]
    code, err = _run(capsys, *common, "--steps", "1")
    assert code == 0, err
    latest = run / "checkpoints" / "latest.pt"
    _fill(small_disk, latest.stat().st_size // 2)  # room for half a checkpoint
    code, err = _run(capsys, *common, "--steps", "2", "--resume", "latest")
    line = _one_line(err)
    assert code == 2 and "disk is full" in line and f"previous checkpoint {latest} is intact" in line, line
    (small_disk / "filler").unlink()
    assert torch.load(latest, weights_only=True)["step"] == 1
