"""The image transform split at the batch: the same tensors as the whole transform per sample."""

import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from torchvision import transforms as T

from clip_ping.data.batch_transform import BatchNormalize, PilToUint8, split_at_batch
from clip_ping.data.order import SeededAugmentation
from clip_ping.data.pairs import PairDataset, collate_pairs
from clip_ping.data.table import open_table
from clip_ping.model.student import create_student


@pytest.mark.parametrize("which", ["train", "eval"])
def test_the_split_transform_gives_the_batch_of_the_whole_one_bitwise(tiny_synth, tiny_model, which):
    _, train_transform, eval_transform, _ = create_student(TINY_MODEL, seed=0)
    transform = train_transform if which == "train" else eval_transform
    per_sample, finish = split_at_batch(transform)
    assert finish is not None and isinstance(per_sample.transforms[-1], PilToUint8)
    table = open_table(tiny_synth, "train")
    whole = SeededAugmentation(PairDataset(table, transform), seed=5, epoch=1)
    split = SeededAugmentation(PairDataset(table, per_sample), seed=5, epoch=1)
    rows = list(range(0, len(table), 3))
    assert split[rows[0]]["image"].dtype == torch.uint8  # per sample only the geometry runs
    expected = collate_pairs([whole[i] for i in rows])["image"]
    got = collate_pairs([split[i] for i in rows], finish_images=finish)["image"]
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)
    if which == "train":  # a random crop: another seed gives other pixels, so the comparison can tell
        other = SeededAugmentation(PairDataset(table, per_sample), seed=6, epoch=1)
        assert not torch.equal(collate_pairs([other[i] for i in rows], finish_images=finish)["image"], expected)


def test_a_transform_that_does_not_end_in_totensor_and_normalize_runs_whole():
    normalize = T.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    for transform in (T.Compose([T.ToTensor(), normalize]),  # no conversion to RGB first: a 16-bit image would differ
                      T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()]),
                      T.Compose([T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3, inplace=True)]),
                      lambda image: torch.zeros(3, 4, 4)):
        per_sample, finish = split_at_batch(transform)
        assert per_sample is transform and finish is None
    # a batch of float images passes collate untouched, even with a finish given
    samples = [{"index": i, "image": torch.full((3, 2, 2), float(i)), "text": "x"} for i in range(2)]
    assert torch.equal(collate_pairs(samples, finish_images=BatchNormalize((0.0,) * 3, (1.0,) * 3))["image"],
                       torch.stack([s["image"] for s in samples]))


def test_the_halves_refuse_what_they_cannot_convert_exactly():
    with pytest.raises(TypeError, match="RGB or L PIL image"):
        PilToUint8()(Image.new("I;16", (4, 4)))
    with pytest.raises(TypeError, match="RGB or L PIL image"):
        PilToUint8()(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        BatchNormalize((0.5,), (0.2,))(torch.zeros(1, 1, 2, 2))
    grey = PilToUint8()(Image.new("L", (4, 3), color=200))
    assert grey.shape == (1, 3, 4) and grey.dtype == torch.uint8
    assert torch.allclose(BatchNormalize((0.5,), (0.25,))(grey[None]), torch.full((1, 1, 3, 4), (200 / 255 - 0.5) / 0.25))
