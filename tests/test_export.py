import open_clip
import torch
from PIL import Image

from clip_ping.hub_export import ExportConfig, export_open_clip
from clip_ping.student import load_student
from clip_ping.trainer import TrainConfig, Trainer


def test_exported_model_loads_in_open_clip_with_the_same_embeddings(tiny_synth, tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(data=str(tiny_synth), out=str(run), method="clip", batch_size=8, steps=2, workers=0,
                        progress=False, tensorboard=False)).fit()
    export_dir = tmp_path / "export"
    export_open_clip(ExportConfig(checkpoint=str(run), out=str(export_dir)))

    ours, our_tokenizer, our_preprocess = load_student(run)
    theirs, _, their_preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
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

    # the bare config + weights file route of open_clip works too
    open_clip.add_model_config(export_dir / "ViT-XXS-8-64.json")
    again = open_clip.create_model("ViT-XXS-8-64", pretrained=str(export_dir / "open_clip_pytorch_model.bin"))
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_text(their_tokenizer(captions), normalize=True), txt_ours, atol=1e-6)
