"""The decoded-image cache: the table's own pixels from memory, the same run with or without it."""

import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, crash_and_resume

from clip_ping.data.image_cache import GIB, DecodedImages, cache_decision
from clip_ping.data.images import ImageDecodeError
from clip_ping.data.table import open_table
from clip_ping.errors import ConfigError
from clip_ping.training.checkpoints import load_checkpoint
from clip_ping.training.trainer import TrainConfig, Trainer


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), method="clip", batch_size=8, steps=6, warmup_steps=2, workers=0,
                log_every=1, save_every=3, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def broken(tiny_synth, tmp_path):
    """The tiny data set with row 3's image file replaced by bytes that are not an image."""
    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    table = open_table(data, "train")
    with open(table.filepaths[3], "wb") as f:
        f.write(b"not an image at all")
    return data


def test_every_row_gives_the_pixels_of_the_table(tiny_synth):
    table = open_table(tiny_synth, "train")
    cache = DecodedImages(table)
    assert cache.fill(workers=0)
    assert cache.filled and cache.nbytes == sum(np.asarray(table.open_image(i)).nbytes for i in range(len(table)))
    for i in range(len(table)):
        got, want = cache.open_image(i), table.open_image(i)
        assert got.mode == "RGB" and got.size == want.size
        assert np.array_equal(np.asarray(got), np.asarray(want)), i
    assert cache.captions is table.captions and len(cache) == len(table)  # the rest is the table's


def test_an_undecodable_row_keeps_the_tables_error(broken):
    table = open_table(broken, "train")
    cache = DecodedImages(table)
    assert cache.fill(workers=2)  # decoded in worker processes
    with pytest.raises(ImageDecodeError) as from_table:
        table.open_image(3)
    with pytest.raises(ImageDecodeError) as from_cache:
        cache.open_image(3)
    assert str(from_cache.value) == str(from_table.value)
    assert np.array_equal(np.asarray(cache.open_image(4)), np.asarray(table.open_image(4)))


def test_a_cache_over_its_budget_stays_empty_and_reads_from_the_table(tiny_synth):
    table = open_table(tiny_synth, "train")
    cache = DecodedImages(table)
    one_image = np.asarray(table.open_image(0)).nbytes
    assert not cache.fill(workers=0, max_bytes=5 * one_image)
    assert not cache.filled and cache.nbytes == 0
    assert np.array_equal(np.asarray(cache.open_image(7)), np.asarray(table.open_image(7)))


def test_auto_caches_images_read_twice_that_fit_the_budget(tiny_synth):
    table = open_table(tiny_synth, "train")
    size = DecodedImages(table).estimated_bytes()
    assert size == len(table) * 32 * 32 * 3  # every image of the tiny set is 32 x 32
    assert cache_decision("auto", table, reads_per_image=4.0, max_gb=1.0)[0]
    assert not cache_decision("auto", table, reads_per_image=1.5, max_gb=1.0)[0]
    too_small, why = cache_decision("auto", table, reads_per_image=4.0, max_gb=size / 2 / GIB)
    assert not too_small and "--image-cache-gb" in why
    assert cache_decision("on", table, reads_per_image=0.5, max_gb=1.0)[0]
    assert not cache_decision("off", table, reads_per_image=10.0, max_gb=1.0)[0]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_a_budget_that_is_not_a_positive_number_is_refused(tiny_synth, tmp_path, value):
    with pytest.raises(ConfigError, match="image_cache_gb"):
        _cfg(tiny_synth, tmp_path / "run", image_cache_gb=value)


def test_a_cached_run_equals_an_uncached_one_and_resumes_exactly(tiny_synth, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="clip_ping.training.trainer"):
        straight, resumed = crash_and_resume(
            lambda out, **kw: _cfg(tiny_synth, out, image_cache="on", workers=2, **kw), tmp_path, crash_step=4)
    # both the straight run and the resumed one decoded every image into memory
    assert caplog.text.count(f"image cache: {len(open_table(tiny_synth, 'train'))} images") >= 2
    plain_run = Trainer(_cfg(tiny_synth, tmp_path / "plain", image_cache="off", workers=2))
    assert plain_run.image_cache is None
    plain_run.fit()

    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "latest.pt")
    assert plain["step"] == straight["step"] == resumed["step"] == 6
    for key in plain["model"]:
        assert torch.equal(plain["model"][key], straight["model"][key]), key
        assert torch.equal(plain["model"][key], resumed["model"][key]), key


def test_an_undecodable_image_is_skipped_and_counted_as_without_the_cache(broken, tmp_path):
    runs = {}
    for setting in ("on", "off"):
        trainer = Trainer(_cfg(broken, tmp_path / setting, image_cache=setting, steps=12))
        runs[setting] = (trainer.fit(), load_checkpoint(tmp_path / setting / "checkpoints" / "latest.pt"))
    assert runs["on"][0]["skipped_images"] == runs["off"][0]["skipped_images"] > 0
    for key, tensor in runs["off"][1]["model"].items():
        assert torch.equal(tensor, runs["on"][1]["model"][key]), key


def test_a_clip_ping_reads_its_neighbour_views_through_the_cache(tiny_banked, tiny_model, tmp_path):
    finals = {}
    for setting in ("on", "off"):
        trainer = Trainer(_cfg(tiny_banked, tmp_path / setting, method="a-clip-ping", model=TINY_MODEL, steps=3,
                               neighbor_topk=3, image_cache=setting))
        if setting == "on":
            assert trainer.objective.batch_preparer().table is trainer.image_cache
        trainer.fit()
        finals[setting] = load_checkpoint(tmp_path / setting / "checkpoints" / "latest.pt")
    for key, tensor in finals["off"]["model"].items():
        assert torch.equal(tensor, finals["on"]["model"][key]), key


def test_a_cached_run_tokenizes_each_caption_once_and_keeps_the_raw_captions(tiny_synth, tmp_path):
    trainer = Trainer(_cfg(tiny_synth, tmp_path / "run", image_cache="on"))
    calls = []
    tokenize = trainer.tokenizer
    trainer.tokenizer = lambda texts: calls.append(len(texts)) or tokenize(texts)
    batches = iter(trainer._loader(0, 0))
    table = open_table(tiny_synth, "train")
    assert calls == [len(table)]  # every caption, once, with the fill
    for _ in range(3):
        batch = next(batches)
        rows = batch["index"].tolist()
        assert batch["caption"] == [table.captions[i] for i in rows]  # for objectives that run a text teacher
        assert torch.equal(batch["text"], tokenize(batch["caption"]))
    assert calls == [len(table)]  # no batch tokenized again
    uncached = Trainer(_cfg(tiny_synth, tmp_path / "plain", image_cache="off"))
    uncached._loader(0, 0)
    assert uncached.caption_tokens is None
