import json

import open_clip
import pytest
import torch
from PIL import Image

from clip_ping.hub.export import ExportConfig, export_open_clip
from clip_ping.model.student import MODEL_CONFIG_DIR, create_student, load_student
from clip_ping.training.trainer import TrainConfig, Trainer


@pytest.mark.floor
def test_exported_model_loads_in_open_clip_with_the_same_embeddings(tiny_synth, tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(data=str(tiny_synth), out=str(run), method="clip", batch_size=8, steps=2, workers=0,
                        progress=False, tensorboard=False)).fit()
    export_dir = tmp_path / "export"
    export_open_clip(ExportConfig(checkpoint=str(run), out=str(export_dir)))

    # the default block's config (same parameters and function as the custom one): loads in open_clip 2.x too
    exported_cfg = json.loads((export_dir / "open_clip_config.json").read_text())["model_cfg"]
    assert "block_type" not in exported_cfg["vision_cfg"] and "block_type" not in exported_cfg["text_cfg"]

    ours, our_tokenizer, our_preprocess = load_student(run)
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    assert type(theirs.visual.transformer.resblocks[0]).__name__ == "ResidualAttentionBlock"
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    theirs.eval()

    image = Image.open(next((tiny_synth / "images" / "test").glob("*.png"))).convert("RGB")
    captions = ["a red circle on a grey background", "two small blue stars"]
    with torch.no_grad():
        img_ours = ours.encode_image(our_preprocess(image)[None], normalize=True)
        img_theirs = theirs.encode_image(their_preprocess(image)[None], normalize=True)
        txt_ours = ours.encode_text(our_tokenizer(captions), normalize=True)
        txt_theirs = theirs.encode_text(their_tokenizer(captions), normalize=True)
    assert torch.allclose(img_ours, img_theirs, atol=1e-6)
    assert torch.allclose(txt_ours, txt_theirs, atol=1e-6)

    # the bare config + weights file route of open_clip works too; it registers the export's config under the
    # shipped name, so the shipped configs are registered again after it for the tests that follow in this process
    try:
        open_clip.add_model_config(export_dir / "ViT-XXS-8-64.json")
        again = open_clip.create_model("ViT-XXS-8-64", pretrained=str(export_dir / "open_clip_pytorch_model.bin"))
    finally:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_text(their_tokenizer(captions), normalize=True), txt_ours, atol=1e-6)


def test_shipped_configs_compute_what_open_clips_default_block_computes_on_the_same_weights():
    """The shipped configs use open_clip's custom attention block (faster on a CPU). A model of the same config
    with open_clip's default block holds the same tensors under the same names and computes the same
    embeddings, so checkpoints saved before the switch load, and either block can read the other's weights."""
    cfg = json.loads((MODEL_CONFIG_DIR / "ViT-XXS-8-64.json").read_text())
    assert cfg["vision_cfg"]["block_type"] == cfg["text_cfg"]["block_type"] == "custom"
    torch.manual_seed(0)
    ours = open_clip.model.CLIP(**cfg)
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["block_type"] = "default"
    default = open_clip.model.CLIP(**cfg)
    assert type(default.visual.transformer.resblocks[0]) is not type(ours.visual.transformer.resblocks[0])
    default.load_state_dict(ours.state_dict())  # strict: same names, same shapes
    ours.eval(), default.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = open_clip.tokenize(["a red circle", "two small blue stars on a grey background", ""], context_length=32)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), default.encode_image(images), atol=1e-5)
        assert torch.allclose(ours.encode_text(texts), default.encode_text(texts), atol=1e-5)


def test_a_student_starts_from_the_weights_open_clips_default_block_draws_from_the_same_seed(tmp_path):
    """The custom block draws wider attention weights; the student keeps the default block's initial
    weights (those of earlier versions, seed for seed), which trained better in the demo."""
    cfg = json.loads((MODEL_CONFIG_DIR / "ViT-XXS-8-64.json").read_text())
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["block_type"] = "default"
    (tmp_path / "XXS-default-block.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    for seed in (0, 5):
        torch.manual_seed(seed)
        expected = open_clip.create_model("XXS-default-block").state_dict()
        torch.manual_seed(123)
        student = create_student("ViT-XXS-8-64", seed=seed)[0]
        assert type(student.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
        got = student.state_dict()
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in got)
        drawn_after = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(drawn_after, torch.rand(3))  # the caller's generator is left as it was


def test_a_config_whose_custom_block_has_parameters_of_its_own_builds(tmp_path):
    """qk_norm gives the custom block norms the default block lacks: its own initial weights are kept."""
    cfg = json.loads((MODEL_CONFIG_DIR / "ViT-XXS-8-64.json").read_text())
    cfg["vision_cfg"]["qk_norm"] = True
    (tmp_path / "XXS-qk-norm.json").write_text(json.dumps(cfg))
    try:
        open_clip.add_model_config(tmp_path)
        a, b = create_student("XXS-qk-norm", seed=0)[0], create_student("XXS-qk-norm", seed=0)[0]
    finally:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    assert any("ln_q" in name for name in a.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())  # still seeded
