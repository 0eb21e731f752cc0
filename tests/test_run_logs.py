"""Metric sinks of a training run: jsonl, TensorBoard, and Weights & Biases offline."""

import json

import pytest

from clip_ping import environment
from clip_ping.errors import ClipPingError
from clip_ping.training.run_logs import RunLogs, parse_log_to

RECORDS = [{"step": s, "epoch": 0, "loss": 2.0 / s, "samples_per_s": 100.0 + s} for s in (1, 2, 3)]


def test_log_to_is_parsed_and_checked():
    assert parse_log_to("tensorboard, wandb,jsonl") == ["tensorboard", "wandb", "jsonl"]
    assert parse_log_to("jsonl,tensorboard", tensorboard=False) == ["jsonl"]
    assert parse_log_to("none") == []
    assert parse_log_to("auto") == ["jsonl", "tensorboard"]  # tensorboard is installed here
    with pytest.raises(ClipPingError, match="unknown sink 'mlflow'"):
        parse_log_to("jsonl,mlflow")


def test_a_sink_without_its_extra_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(environment.EXTRAS, "wandb", ("no_such_wandb", "Weights & Biases logging"))
    with pytest.raises(ClipPingError, match=r"pip install 'clip-ping\[wandb\]'"):
        RunLogs(tmp_path, "jsonl,wandb", "run")


def test_jsonl_and_tensorboard_get_every_record(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = RunLogs(tmp_path, "jsonl,tensorboard", "run")
    for record in RECORDS:
        logs.log(record)
    logs.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == RECORDS
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0), (3, 0.6667)]


def test_wandb_offline_run_holds_name_config_and_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = RunLogs(tmp_path, "wandb", "ping-seed3", {"lambda_nn": 0.25, "method": "clip-ping"})
    for record in RECORDS:
        logs.log(record)
    logs.close()
    wandb.teardown()  # W&B's service writes the run file after finish() returns; this waits for it
    runs = list((tmp_path / "wandb").glob("offline-run-*ping-seed3*"))
    assert len(runs) == 1, "one offline run, named after the clip-ping run"
    # The run's transaction log (protobuf records) holds its name, config and metrics.
    data = next(runs[0].glob("*.wandb")).read_bytes()
    for expected in (b"ping-seed3", b"lambda_nn", b"clip-ping", b"train/loss", b"train/samples_per_s"):
        assert expected in data, expected


def test_training_logs_to_wandb_offline_with_the_run_name(tiny_synth, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from clip_ping.training.trainer import TrainConfig, Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "clip-run"
    Trainer(TrainConfig(data=str(tiny_synth), out=str(run), method="clip", batch_size=8, steps=2, workers=0,
                        progress=False, log_to="jsonl,wandb", log_every=1)).fit()
    wandb.teardown()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run / "tensorboard").exists()  # not asked for
    data = next((run / "wandb").glob("offline-run-*clip-run*/*.wandb")).read_bytes()
    assert b"clip-run" in data and b"train/loss" in data and b"batch_size" in data
