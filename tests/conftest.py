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
