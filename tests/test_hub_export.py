"""The export folder in open_clip's Hugging Face hub layout, with a model card generated from the run."""

import json

import open_clip
import pytest
import torch

from clip_ping.cli import main
from clip_ping.errors import ClipPingError
from clip_ping.hub.export import ExportConfig, export_open_clip, verify_export


@pytest.fixture
def run_folder(tiny_model, tmp_path):
    """A run folder as training leaves it: a checkpoint (weights + config) and an eval.json."""
    from conftest import TINY_MODEL

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {"data": "data/openclipart", "method": "clip-ping", "batch_size": 256, "lambda_nn": 0.25,
              "lambda_xnn": 0.25, "seed": 3}
    torch.save({"model": tiny_model[0].state_dict(), "model_name": TINY_MODEL, "config": config, "step": 1200},
               run / "checkpoints" / "latest.pt")
    (run / "eval.json").write_text(json.dumps({
        "zeroshot": {"category": {"top1": 41.25, "top5": 77.5, "n": 80}},
        "retrieval": {"image_to_text": {"R@1": 12.5, "R@5": 30.0}, "text_to_image": {"R@1": 10.0, "R@5": 27.5}},
        "linear_probe": {"category": {"accuracy": 55.0}}}))
    return run


def test_export_is_a_hub_folder_with_a_card_from_the_run(run_folder, tmp_path, tiny_model):
    out = tmp_path / "export"
    export_open_clip(ExportConfig(checkpoint=str(run_folder), out=str(out)))
    hub = json.loads((out / "open_clip_config.json").read_text())
    assert set(hub) == {"model_cfg", "preprocess_cfg"} and hub["preprocess_cfg"]["size"] == [32, 32]
    assert (out / "open_clip_model.safetensors").is_file() and (out / "open_clip_pytorch_model.bin").is_file()

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n")
    for expected in ("data/openclipart", "CLIP-PING", "| lambda_nn | 0.25 |", "| steps trained | 1200 |",
                     "| zero-shot category | top-1 % | 41.25 |", "| retrieval image to text | R@5 | 30.00 |",
                     "| linear probe category | accuracy % | 55.00 |"):
        assert expected in card, expected

    # open_clip loads the folder by itself, with the same weights
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a red square"])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_text(tokens), tiny_model[0].encode_text(tokens), atol=1e-6)
    assert verify_export(out) == {"tensors": len(model.state_dict())}


def test_a_config_that_does_not_match_its_weights_is_refused(run_folder, tmp_path, capsys):
    out = tmp_path / "export"
    export_open_clip(ExportConfig(checkpoint=str(run_folder), out=str(out)))
    hub = json.loads((out / "open_clip_config.json").read_text())
    hub["model_cfg"]["embed_dim"] = 48  # the weights were trained with 32
    (out / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(ClipPingError, match="does not match its weights"):
        verify_export(out)
    (tmp_path / "data").mkdir()
    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "open_clip_config.json does not match its weights" in err
