import json
import os

import pytest

# everything loads from installed packages; a hub lookup would be a bug
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A tiny built-in data set (48 train / 8 val / 16 test pairs, 32 px), made once per session."""
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(SynthConfig(out=str(out), seed=3, n_train=48, n_val=8, n_test=16, image_size=32, workers=1),
                       progress=False)
    return out


TINY_MODEL = "clip-ping-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random open_clip model (registered from a config file written here), its tokenizer and transform."""
    import open_clip
    import torch

    config_dir = tmp_path_factory.mktemp("model_configs")
    (config_dir / f"{TINY_MODEL}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    model.eval()
    return model, open_clip.get_tokenizer(TINY_MODEL), preprocess
