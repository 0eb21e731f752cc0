"""A student started from pretrained open_clip weights (--init-from): files, folders, hub names offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clip_ping.errors import ConfigError, DataError
from clip_ping.hub.export import ExportConfig, export_open_clip
from clip_ping.model.student import create_student
from clip_ping.training.checkpoints import load_checkpoint
from clip_ping.training.trainer import TrainConfig, Trainer

MODEL = "ViT-XXS-8-64"


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), method="clip", model=MODEL, batch_size=8, steps=4, warmup_steps=1,
                workers=0, log_every=1, save_every=2, progress=False, tensorboard=False, log_to="jsonl")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 'pretrained' model (seed 123, not the students' seed 0) saved three ways: a safetensors state dict,
    an open_clip .bin, and a hub folder written by clip-ping's own export."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("pretrained")
    model = create_student(MODEL, seed=123)[0]
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # something no random init gives
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "weights.safetensors"))
    torch.save(sd, folder / "weights.bin")
    torch.save({"model": sd, "model_name": MODEL, "step": 7, "config": {"method": "clip"}}, folder / "ckpt.pt")
    export_open_clip(ExportConfig(checkpoint=str(folder / "ckpt.pt"), out=str(folder / "hub")))
    return folder, sd


def _weights_at_first_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Run the trainer and keep the student's weights as the first optimisation step begins."""
    seen: dict[str, torch.Tensor] = {}
    real_step = trainer.train_step

    def step(batch):
        if not seen:
            seen.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return real_step(batch)

    trainer.train_step = step
    trainer.fit()
    return seen


@pytest.mark.parametrize("form", ["weights.bin", "ckpt.pt", "hub"])
def test_every_local_form_loads_the_same_weights(pretrained, form):
    from clip_ping.hub.pretrained import init_student

    folder, sd = pretrained
    model = create_student(MODEL, seed=0)[0]
    assert init_student(model, str(folder / form), MODEL)["tensors"] == len(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("form", ["weights.safetensors", "local-dir:hub"])
def test_first_step_starts_from_the_file(tiny_synth, tmp_path, pretrained, form):
    folder, sd = pretrained
    source = f"local-dir:{folder / 'hub'}" if form.startswith("local-dir:") else str(folder / form)
    # --resume auto on a new folder starts the run, from the source
    resume = "auto" if form.startswith("local-dir:") else None
    weights = _weights_at_first_step(Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=source, steps=1, resume=resume)))
    assert weights.keys() == sd.keys()
    for key, tensor in sd.items():
        assert torch.equal(weights[key], tensor), key
    # without init_from the same run starts elsewhere (the test could fail)
    random_start = create_student(MODEL, seed=0)[0].state_dict()
    assert not torch.equal(random_start["visual.conv1.weight"], sd["visual.conv1.weight"])
    # the source is recorded: config.yaml (absolute path), the checkpoint's config, the model card
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["init_from"]
    assert recorded.removeprefix("local-dir:") == str((folder / form.removeprefix("local-dir:")).resolve())
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["config"]["init_from"] == recorded
    export_open_clip(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "export")))
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"Initialised from `{recorded}`" in card


def test_resume_of_a_run_from_pretrained_weights_is_exact_and_never_reads_the_source(tiny_synth, tmp_path, pretrained):
    folder, _ = pretrained
    source = tmp_path / "init.safetensors"
    source.write_bytes((folder / "weights.safetensors").read_bytes())
    Trainer(_cfg(tiny_synth, tmp_path / "straight", init_from=str(source))).fit()

    crashing = Trainer(_cfg(tiny_synth, tmp_path / "resumed", init_from=str(source)))
    real_step = crashing.train_step

    def crash_at_step_3(batch):
        if crashing.step == 3:
            raise KeyboardInterrupt  # a kill after the step-2 checkpoint
        return real_step(batch)

    crashing.train_step = crash_at_step_3
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    source.unlink()  # the checkpoint wins: the source is not needed any more
    Trainer(_cfg(tiny_synth, tmp_path / "resumed", init_from=str(source), resume="latest")).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # a new run that names a missing source is refused before anything is written
    with pytest.raises(DataError, match="init_from: weights file not found"):
        Trainer(_cfg(tiny_synth, tmp_path / "new", init_from=str(source)))
    assert not (tmp_path / "new").exists()


def test_weights_of_another_model_are_refused_naming_the_key(tiny_synth, tmp_path, pretrained):
    from safetensors.torch import save_file

    other = create_student("ViT-XS-16", seed=0)[0].state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "xs16.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit student model ViT-XXS-8-64: first mismatched key "
                                          r"'positional_embedding' \(shape \(77, 256\) in the file, \(32, 128\) in the model\)"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=str(tmp_path / "xs16.safetensors")))
    # one tensor short
    folder, sd = pretrained
    short = dict(sd)
    del short["visual.proj"]
    torch.save(short, tmp_path / "short.bin")
    with pytest.raises(ConfigError, match=r"first mismatched key 'visual.proj' \(missing from the file\)"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=str(tmp_path / "short.bin")))
    # a folder whose config is another model's, even where the weights would fit
    edited = json.loads((folder / "hub" / "open_clip_config.json").read_text())
    edited["model_cfg"]["quick_gelu"] = True
    hub2 = tmp_path / "hub2"
    hub2.mkdir()
    (hub2 / "open_clip_config.json").write_text(json.dumps(edited))
    (hub2 / "open_clip_model.safetensors").write_bytes((folder / "hub" / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"another config than student ViT-XXS-8-64: first difference 'quick_gelu'"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=str(hub2)))
    with pytest.raises(DataError, match="not an open_clip model folder: expected .*open_clip_config.json"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="holds weights of open_clip model ViT-B-32, but the student is ViT-XXS-8-64"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from="ViT-B-32:openai"))
    from clip_ping.hub.pretrained import resolve

    with pytest.raises(ConfigError, match="trained with QuickGELU, the student ViT-B-32 uses GELU; pass --model ViT-B-32-quickgelu"):
        resolve("ViT-B-32:openai", "ViT-B-32")  # refused before anything is fetched
    with pytest.raises(DataError, match="init_from: weights file not found: runs/x:y"):
        resolve("runs/x:y", MODEL)
    with pytest.raises(ConfigError, match="no pretrained tag 'nope' for ViT-XXS-8-64"):
        Trainer(_cfg(tiny_synth, tmp_path / "run", init_from=f"{MODEL}:nope"))


OFFLINE_SCRIPT = """
import contextlib, io, json, sys
from clip_ping.cli import main
from clip_ping.errors import ClipPingError
from clip_ping.hub.pretrained import resolve
out = {}
for spec, model in (("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32"), ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-32")):
    try:
        resolve(spec, model)
        out[spec] = "loaded"
    except ClipPingError as exc:
        out[spec] = str(exc)
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    code = main(sys.argv[1:])
print(json.dumps({"resolve": out, "code": code, "stderr": stderr.getvalue()}))
"""


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """The user's offline setting, and empty caches so that nothing a past run fetched can answer."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_hub_names_fail_offline_with_one_line(tiny_synth, tmp_path):
    """In a fresh process with the user's HF_HUB_OFFLINE=1 (read when huggingface_hub is imported) and empty caches."""
    train = ["train", "--data", str(tiny_synth), "--out", str(tmp_path / "run"), "--method", "clip", "--steps", "1",
             "--batch-size", "8", "--workers", "0", "--init-from", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"]
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, *train], env=_offline_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for spec, message in result["resolve"].items():
        assert message.startswith(f"init_from '{spec}': cannot fetch it from the hub ("), message
        assert "\n" not in message and "copy the weights file or model folder here" in message
    # the command line: exit 2, one error line, no traceback, nothing written
    assert result["code"] == 2 and "Traceback" not in result["stderr"] + done.stderr
    errors = [line for line in result["stderr"].splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("clip-ping train: error: init_from 'hf-hub:laion/CLIP-ViT-B-32")
    assert not (tmp_path / "run").exists()
    assert not any((tmp_path / "hf").rglob("*.safetensors"))  # nothing was downloaded


def test_dry_run_reads_and_checks_a_local_source(tiny_synth, tmp_path, pretrained):
    from clip_ping.plan import plan_train

    folder, sd = pretrained
    plan = plan_train(_cfg(tiny_synth, tmp_path / "run", init_from=str(folder / "hub")))
    assert plan["init_from"] == str(folder / "hub" / "open_clip_model.safetensors")
    plan = plan_train(_cfg(tiny_synth, tmp_path / "run", init_from="hf-hub:x/y"))
    assert plan["init_from"] == "hf-hub:x/y (fetched by open_clip when the run starts)"
    with pytest.raises(DataError, match="init_from: weights file not found"):
        plan_train(_cfg(tiny_synth, tmp_path / "run", init_from=str(tmp_path / "missing.bin")))
    assert not (tmp_path / "run").exists()
