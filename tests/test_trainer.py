import json
import math
import os

import pytest
import torch

from clip_ping.data.order import EpochBatchSampler
from clip_ping.errors import ConfigError
from clip_ping.training.checkpoints import load_checkpoint
from clip_ping.training.schedule import warmup_cosine_lr
from clip_ping.training.trainer import TrainConfig, Trainer, TrainingDiverged, parameter_groups


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), method="clip", batch_size=8, steps=6, warmup_steps=2, workers=0,
                log_every=1, save_every=3, progress=False, tensorboard=False, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_schedule_warms_up_then_decays_to_min():
    lrs = [warmup_cosine_lr(s, 1.0, 10, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0)


def test_epoch_batches_split_over_processes_into_the_global_batch():
    one = list(EpochBatchSampler(40, 8, seed=1, epoch=2))
    halves = [list(EpochBatchSampler(40, 8, seed=1, epoch=2, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == one
    assert list(EpochBatchSampler(40, 8, seed=1, epoch=2, start_batch=3)) == one[3:]
    assert sorted(i for b in one for i in b) == sorted(set(i for b in one for i in b))


def test_weight_decay_skips_gains_biases_and_logit_scale():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    decay, no_decay = parameter_groups([model], 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_training_lowers_the_loss_and_writes_the_run_folder(tiny_synth, tmp_path):
    summary = Trainer(_cfg(tiny_synth, tmp_path / "run", steps=12, lr=2e-3)).fit()
    assert summary["step"] == 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert min(r["loss"] for r in records[-4:]) < records[0]["loss"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 12 and state["model_name"] == "ViT-XXS-8-64"


@pytest.mark.floor
def test_killed_and_resumed_run_ends_with_identical_weights(tiny_synth, tmp_path):
    Trainer(_cfg(tiny_synth, tmp_path / "straight")).fit()

    crashing = Trainer(_cfg(tiny_synth, tmp_path / "resumed"))
    real_step = crashing.train_step

    def crash_at_step_4(batch):
        if crashing.step == 4:
            raise KeyboardInterrupt  # stands in for a kill after the step-3 checkpoint
        return real_step(batch)

    crashing.train_step = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")["step"] == 3
    Trainer(_cfg(tiny_synth, tmp_path / "resumed", resume="latest")).fit()

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run"))
    real_step = trainer.train_step

    def poisoned(batch):
        if trainer.step == 4:
            batch = dict(batch, image=batch["image"] * float("nan"))
        return real_step(batch)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDiverged, match="at step 4"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 3


def test_stop_signal_finishes_the_step_and_saves(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", steps=20, save_every=100))
    real_step = trainer.train_step

    def signal_at_step_2(batch):
        result = real_step(batch)
        if trainer.step == 2:
            trainer._stop_signal = "SIGTERM"
        return result

    trainer.train_step = signal_at_step_2
    summary = trainer.fit()
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 2


def test_bad_settings_are_refused(tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match="larger than the data set"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", batch_size=4096))
    with pytest.raises(ConfigError, match="unknown student model"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", model="ViT-nope"))


def test_logit_scale_is_clamped_at_100(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", steps=1))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(math.log(1000.0))
    trainer.fit()
    assert trainer.model.logit_scale.exp().item() <= 100.0 + 1e-4


def _grads_of_one_step(trainer, batch):
    trainer.optimizer.step = lambda: None  # keep the gradients of this step for inspection
    trainer.train_step(batch)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _first_batch(trainer):
    return next(iter(trainer._loader(epoch=0, start_batch=0)))


def test_training_batches_carry_the_tokens_of_their_own_captions(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run"))
    batch = _first_batch(trainer)
    rows = batch["index"].tolist()
    assert len(set(rows)) == len(rows) == trainer.cfg.batch_size
    expected = torch.stack([trainer.tokenizer([trainer.table.captions[i]])[0] for i in rows])
    assert torch.equal(batch["text"], expected)


@pytest.mark.floor
def test_optimizer_uses_the_fused_adamw_kernel(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run"))
    assert trainer.optimizer.defaults["fused"] is True


@pytest.mark.parametrize("extra", [{}, {"grad_checkpointing": True}])
def test_gradient_accumulation_matches_the_full_batch(tiny_synth, tmp_path, extra):
    full = Trainer(_cfg(tiny_synth, tmp_path / "a", grad_clip=None))
    accum = Trainer(_cfg(tiny_synth, tmp_path / "b", grad_clip=None, accum_steps=4, **extra))
    batch = _first_batch(full)
    for g_full, g_acc in zip(_grads_of_one_step(full, batch), _grads_of_one_step(accum, batch)):
        assert torch.allclose(g_full, g_acc, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("sig, workers, whole_group", [
    ("SIGTERM", 0, False),
    # schedulers and Ctrl-C signal the whole process group, the loader workers included
    ("SIGTERM", 2, True),
    ("SIGINT", 2, True),
])
def test_a_stop_signal_saves_a_loadable_checkpoint_and_says_how_to_resume(tiny_synth, tmp_path, sig, workers, whole_group):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clip_ping.cli", "train", "--data", str(tiny_synth), "--out", str(run), "--method", "clip",
         "--steps", "100000", "--batch-size", "8", "--workers", str(workers), "--log-every", "1",
         "--save-every", "100000", "--no-progress", "--no-tensorboard"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    signum = getattr(signal, sig)
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume latest" in err and "Traceback" not in err
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["step"] >= 2
    assert json.loads(out)["stopped_by"] == sig


def test_streamed_shards_train_and_resume_exactly(tiny_synth, tmp_path):
    from clip_ping.data.convert import ConvertConfig, convert

    shards = tmp_path / "shards"
    convert(ConvertConfig(src=str(tiny_synth), out=str(shards), samples_per_shard=12))
    stream = dict(data_mode="stream", shuffle_buffer=16, workers=1, steps=8, save_every=3)
    Trainer(_cfg(shards, tmp_path / "straight", **stream)).fit()

    crashing = Trainer(_cfg(shards, tmp_path / "resumed", **stream))
    real_step = crashing.train_step

    def crash_at_step_7(batch):
        if crashing.step == 7:  # after the step-6 checkpoint, in the second epoch
            raise KeyboardInterrupt
        return real_step(batch)

    crashing.train_step = crash_at_step_7
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    Trainer(_cfg(shards, tmp_path / "resumed", resume="latest", **stream)).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] >= 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_streaming_a_csv_data_set_is_refused(tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match="shards"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", data_mode="stream")).fit()


def test_student_targets_come_from_the_stored_embeddings_of_queued_neighbours():
    from clip_ping.objectives.targets import StudentTargets

    student = StudentTargets(n_samples=6, embed_dim=3)
    u, v = torch.eye(3)[[0, 1]], torch.eye(3)[[2, 0]]
    targets = student(torch.tensor([4, 5]), u, v, p=torch.tensor([5, 4]), q=torch.tensor([4, 4]))
    # p of row 0 is sample 5 (row 1 of this batch): its u is pulled to u_5 and across to v_5
    assert torch.equal(targets["nn_image"][0], u[1]) and torch.equal(targets["xnn_image"][0], v[1])
    assert torch.equal(targets["nn_text"][1], v[0]) and torch.equal(targets["xnn_text"][1], u[0])
    assert not targets["nn_image"].requires_grad


def test_student_targets_without_the_queue_are_refused():
    from clip_ping.config import from_dict

    with pytest.raises(ConfigError, match="neighbor_source=queue"):
        from_dict(TrainConfig, {"targets": "student"})


def test_device_auto_is_the_cpu_without_a_gpu_and_bad_devices_are_refused(monkeypatch):
    from clip_ping.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert TrainConfig().device == "auto"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("foo")


@pytest.mark.floor
def test_fp16_trains_with_a_gradient_scaler_that_is_checkpointed(tiny_synth, tmp_path):
    summary = Trainer(_cfg(tiny_synth, tmp_path / "run", precision="fp16", steps=3)).fit()
    assert summary["step"] == 3
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["scaler"]["scale"] > 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_gpu_loader_pins_memory_and_yields_the_same_batches(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run"))
    plain = list(trainer._loader(epoch=1, start_batch=0))
    trainer.device = torch.device("cuda")  # only the loader options read it here
    assert trainer._loader_options()["pin_memory"] is True
    pinned = list(trainer._loader(epoch=1, start_batch=0))
    assert len(plain) == len(pinned)
    for a, b in zip(plain, pinned):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["text"], b["text"])


def test_one_run_loader_continues_epoch_after_epoch_with_steps_tagged():
    from clip_ping.data.order import RunBatches

    run = list(RunBatches(40, 8, seed=1, epoch=2, start_batch=3, first_step=13, total_steps=20))
    expected = [(e, b) for e, b in [(2, 3), (2, 4)] + [(3, b) for b in range(5)]]
    assert len(run) == 7 == len(expected)
    for batch, (epoch, b) in zip(run, expected):
        indices = [i for i, _, _ in batch]
        assert indices == list(EpochBatchSampler(40, 8, seed=1, epoch=epoch))[b]
        assert {e for _, e, _ in batch} == {epoch}
    assert [batch[0][2] for batch in run] == list(range(13, 20))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_without_native_arithmetic_is_warned_and_auto_picks_fp32(tiny_synth, tmp_path, monkeypatch, caplog,
                                                                       native):
    """bf16 on a CPU that emulates it is many times slower: the trainer says so, and the demo's auto avoids it."""
    from clip_ping import distributed
    from clip_ping.demo import train_precision

    monkeypatch.setattr(distributed, "native_bf16", lambda device: native)
    with caplog.at_level("WARNING", logger="clip_ping.training.trainer"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", precision="bf16", steps=1))
    warned = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert train_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert train_precision("fp32", "cpu") == "fp32" and train_precision("bf16", "cpu") == "bf16"
    # the demo's --dry-run shows what auto resolves to on this machine
    from clip_ping.demo import DemoConfig
    from clip_ping.plan import plan_demo

    assert plan_demo(DemoConfig())["training_precision"] == ("bf16" if native else "fp32")
    assert plan_demo(DemoConfig(precision="fp32"))["training_precision"] == "fp32"
    assert plan_demo(DemoConfig(jobs=1))["training_processes_side_by_side"] == 1
    assert plan_demo(DemoConfig())["training_processes_side_by_side"] == (2 if (os.cpu_count() or 1) >= 2 else 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.floor
def test_bf16_training_on_a_cpu_keeps_attention_off_the_flash_kernel(tiny_synth, tmp_path, precision):
    """torch's CPU flash-attention backward is ~6x slower in bf16 than in fp32 (BENCHMARKS.md): a bf16
    step runs attention through the math backend, whose matmuls are bf16; fp32 keeps the flash kernel."""
    from torch.profiler import ProfilerActivity, profile

    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", precision=precision, steps=1))
    batch = _first_batch(trainer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    ops = {event.key for event in prof.key_averages()}
    flash = {op for op in ops if "flash_attention" in op}
    assert "aten::scaled_dot_product_attention" in ops
    if precision == "bf16":
        assert not flash and "aten::_scaled_dot_product_attention_math" in ops
        assert any(op.startswith("aten::bmm") or op == "aten::matmul" for op in ops)
    else:
        assert flash


def test_dry_run_memory_counts_what_a_cpu_bf16_step_saves(monkeypatch):
    """A bf16 training step on a CPU runs attention through the math kernel, which saves each layer's attention
    probabilities (heads x T x T, bf16) for the backward pass: the dry run's activation estimate counts them."""
    import contextlib

    from clip_ping import distributed
    from clip_ping.model.student import create_student
    from clip_ping.plan import student_cost_per_sample

    model = create_student("ViT-XXS-8-64", seed=0)[0]
    _, counted = student_cost_per_sample(model, "bf16")

    @contextlib.contextmanager
    def autocast_only(device, precision):  # the fused attention kernel, which keeps no T x T matrix
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield

    monkeypatch.setattr(distributed, "training_autocast", autocast_only)
    _, fused = student_cost_per_sample(model, "bf16")
    vision_tokens, text_tokens, heads = (64 // 8) ** 2 + 1, 32, 4  # ViT-XXS-8-64: 4 + 3 layers of 4 heads
    probabilities = 2 * heads * (4 * vision_tokens ** 2 + 3 * text_tokens ** 2)
    assert counted - fused >= probabilities


@pytest.mark.floor
def test_grad_checkpointing_recomputes_every_block_and_keeps_the_parameter_names(tiny_synth, tmp_path):
    plain = Trainer(_cfg(tiny_synth, tmp_path / "a"))
    checkpointed = Trainer(_cfg(tiny_synth, tmp_path / "b", grad_checkpointing=True))
    assert list(checkpointed.model.state_dict()) == list(plain.model.state_dict())
    def attention_calls_in_one_step(trainer: Trainer) -> int:
        calls = []
        for tower in (trainer.model.visual.transformer, trainer.model.transformer):
            for block in tower.resblocks:
                block.attn.register_forward_hook(lambda module, args, out: calls.append(module))
        trainer.train_step(_first_batch(trainer))
        return len(calls)

    blocks = len(plain.model.visual.transformer.resblocks) + len(plain.model.transformer.resblocks)
    assert attention_calls_in_one_step(plain) == blocks
    assert attention_calls_in_one_step(checkpointed) == 2 * blocks  # run again in the backward pass


def test_latest_is_a_copy_of_the_step_checkpoint_never_a_second_name(tmp_path):
    from clip_ping.training.checkpoints import save_checkpoint

    folder = tmp_path / "checkpoints"
    for step in (5, 6, 7):
        path = save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, folder, step, keep=2)
        assert not os.path.samefile(path, folder / "latest.pt")  # its own file: a rollback by hand changes one
        assert path.read_bytes() == (folder / "latest.pt").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_0000006.pt", "step_0000007.pt"]
    assert load_checkpoint(folder / "latest.pt")["step"] == 7
    save_checkpoint({"step": 9}, tmp_path / "only-latest", 9, keep=0)
    assert [p.name for p in (tmp_path / "only-latest").iterdir()] == ["latest.pt"]


def test_cuda_without_an_index_is_this_processes_gpu(monkeypatch):
    """The CUDA branch of resolve_device, run here with a pretend two-GPU node: ``cuda`` is
    ``cuda:LOCAL_RANK``, the process's current device is set, and a missing GPU is one line."""
    from clip_ping import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.resolve_device("cuda") == torch.device("cuda", 1)
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"cuda:2 does not exist; this machine has 2 GPU\(s\) \(LOCAL_RANK=2\)"):
        distributed.resolve_device("cuda")


# --------------------------------------------------------------------------- the CUDA twins (pytest -m cuda)


@pytest.mark.cuda
def test_fp16_on_cuda_scales_the_loss_and_checkpoints_the_scaler_as_plain_values(tiny_synth, tmp_path):
    """The GPU twin of the fp16 test: the scaler really scales there, and its state is plain numbers,
    so the checkpoint loads with weights_only=True and a resumed run continues from the same scale."""
    Trainer(_cfg(tiny_synth, tmp_path / "run", precision="fp16", steps=3, device="cuda")).fit()
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    scaler = state["scaler"]
    assert isinstance(scaler["scale"], float) and scaler["scale"] > 0
    assert all(isinstance(v, (int, float)) for v in scaler.values())
    resumed = Trainer(_cfg(tiny_synth, tmp_path / "run", precision="fp16", steps=5, device="cuda", resume="latest"))
    resumed._prepare_run_folder()
    assert resumed.scaler.get_scale() == scaler["scale"] and resumed.step == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cuda_runs_the_student_in_the_asked_dtype(precision):
    from clip_ping.distributed import training_autocast

    layer = torch.nn.Linear(8, 8).cuda()
    with training_autocast(torch.device("cuda", 0), precision):
        out = layer(torch.randn(4, 8, device="cuda"))
    assert out.dtype == (torch.float16 if precision == "fp16" else torch.bfloat16)
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


@pytest.mark.cuda
def test_the_cuda_loader_pins_its_batches_and_they_arrive_unchanged(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", device="cuda"))
    batch = next(iter(trainer._loader(epoch=1, start_batch=0)))
    assert batch["image"].is_pinned() and batch["text"].is_pinned()
    on_gpu = batch["image"].to(trainer.device, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), batch["image"])


@pytest.mark.cuda
def test_a_run_on_cuda_killed_and_resumed_ends_near_the_unbroken_run(tiny_synth, tmp_path):
    """Bitwise equality is not promised on a GPU (atomics in some kernels); the weights stay within bf16 noise."""
    from conftest import crash_and_resume

    straight, resumed = crash_and_resume(
        lambda out, **kw: _cfg(tiny_synth, out, precision="bf16", steps=4, save_every=2, device="cuda", **kw),
        tmp_path, crash_step=3)
    assert resumed["step"] == straight["step"] == 4
    worst = max(float((a.double() - resumed["model"][k].double()).abs().max())
                for k, a in straight["model"].items() if a.is_floating_point())
    assert worst < 1e-2
