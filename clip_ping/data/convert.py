"""Converting between storage forms: a CSV table to tar shards, shards to a CSV, foreign tars to an index.

`write_shards` and `shards_to_csv` write one split; `convert` is the
`clip-ping data convert` stage over every split of a data set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import claim_files, claim_folder
from .csv_reader import read_pairs
from .pairs import SKIP_MISSING_IMAGE, PairTable
from .shard_index import expand_shards
from .shards import IMAGE_EXTS, ShardTable, index_shards
from .table import open_table, stored_splits

log = logging.getLogger(__name__)


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed metadata: the same samples give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shards(table: PairTable, out_dir: str | Path, split: str = "train", samples_per_shard: int = 1000) -> ShardTable:
    """Write a PairTable as ``<split>-NNNNNN.tar`` shards (image bytes copied as they are) and index them.

    Sample ``i`` of the table gets key ``<split>-<i, 9 digits>`` and keeps index ``i``
    (unless its image file cannot be read any more, then it is left out and counted).
    """
    if samples_per_shard < 1:
        raise ConfigError("config key 'samples_per_shard' must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    unreadable = 0
    columns = list(table.labels)
    try:
        for i in range(len(table)):
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(out_dir / f"{split}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            src = Path(table.filepaths[i])
            try:
                image = src.read_bytes()
            except OSError:
                unreadable += 1
                continue
            ext = src.suffix.lower().lstrip(".") or "img"
            if ext not in IMAGE_EXTS:
                ext = "png" if image[:4] == b"\x89PNG" else "jpg"
            key = f"{split}-{i:09d}"
            meta = {"labels": {c: table.labels[c][i] for c in columns}, "source": os.path.relpath(src, table.root)}
            assert tar is not None
            for name, data in (
                (f"{key}.{ext}", image),
                (f"{key}.txt", table.captions[i].encode("utf-8")),
                (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
            ):
                tar.addfile(*_tar_member(name, data))
    finally:
        if tar is not None:
            tar.close()
    result = index_shards(paths, out_dir / f"{split}.shards.json", split)
    if unreadable:
        result.skipped[SKIP_MISSING_IMAGE] = result.skipped.get(SKIP_MISSING_IMAGE, 0) + unreadable
        log.warning("%d image file(s) of %s could not be read and were left out", unreadable, table.source)
    return result


def shards_to_csv(table: ShardTable, out_dir: str | Path, split: str) -> PairTable:
    """Extract a shard split to ``OUT/images/<split>/`` + ``OUT/<split>.csv`` (same order, same indices)."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    columns = list(table.labels)
    with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "caption", *columns])
        for i, key in enumerate(table.keys):
            name = f"{key.replace('/', '_')}.{table.exts[i]}"
            (image_dir / name).write_bytes(table.read_image_bytes(i))
            writer.writerow([f"images/{split}/{name}", table.captions[i]] + [table.labels[c][i] for c in columns])
    return read_pairs(out_dir / f"{split}.csv", label_keys=columns)


# --------------------------------------------------------------------------- convert


@dataclass
class ConvertConfig(Config):
    src: str = option("", "data set folder, CSV/TSV file, shard folder, or tar shards ('dir/*.tar', 'a-{000..009}.tar')")
    out: str = option("", "output folder")
    to: str = option("shards", "target format", choices=("shards", "csv", "index"))
    split: str = option("", "only this split (default: every split found; 'train' for a bare CSV or tar list)")
    samples_per_shard: int = option(1000, "samples per tar shard", bounds=">= 1")
    image_key: str = option("filepath", "image path column of the CSV (open_clip's csv_img_key)")
    caption_key: str = option("caption", "caption column of the CSV (open_clip's csv_caption_key)")
    separator: str = option("", "CSV separator (default: by suffix; ',' or '\\t')")
    overwrite: bool = option(False, "write into a non-empty output folder")
    label_fields: list[str] = option([], "indexing foreign shards: top-level fields of each sample's JSON kept as label "
                                     "columns (a JSON 'labels' object always is; img2dataset's url, status, sizes... "
                                     "are not labels)")
    workers: int = option(2, "indexing: processes scanning shards in parallel", bounds=">= 0")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        if not self.src:
            raise ConfigError("config key 'src' is required (the data to convert)")
        if not self.out:
            raise ConfigError("config key 'out' is required (the output folder)")


def _is_tar_spec(src: str) -> bool:
    return src.endswith(".tar") or src.endswith(".tar}") or "{" in src


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert between CSV tables and tar shards; returns (and writes) a JSON summary.

    * ``to=shards``: each split table of ``src`` -> ``OUT/<split>-NNNNNN.tar`` + index.
    * ``to=csv``: each ``<split>.shards.json`` (or tar list) of ``src`` -> images + ``OUT/<split>.csv``.
    * ``to=index``: index foreign tar shards (``src``, a list/glob/brace range) in place of
      a copy: writes only ``OUT/<split>.shards.json`` + ``OUT/<split>.index.bin``.
    ``dataset.json`` is copied along.
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    src = Path(cfg.src)
    if cfg.to == "index":  # the index only: OUT may be the shards' own folder
        split = cfg.split or "train"
        claim = claim_files(out, "shard index", [f"{split}.shards.json", f"{split}.index.bin", "convert_summary.json"])
    else:
        claim = claim_folder(out, "converted data set", overwrite=cfg.overwrite)
        if claim.recorded and not cfg.overwrite:
            raise DataError(f"{out} already holds a converted data set; pass --overwrite to replace it, or another --out")
        claim.require_only_own()
    before = claim.snapshot()
    try:
        return _convert(cfg, out, src, started)
    finally:
        claim.record_new(before)  # the shards and images written, also by a run that failed half-way


def _convert(cfg: ConvertConfig, out: Path, src: Path, started: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"src": cfg.src, "out": str(out), "to": cfg.to, "splits": {}}
    read_kwargs = {"image_key": cfg.image_key, "caption_key": cfg.caption_key, "separator": cfg.separator or None}

    if cfg.to in ("shards", "csv") and not _is_tar_spec(cfg.src):
        if src.is_dir():
            splits = [cfg.split] if cfg.split else stored_splits(src)
            if not splits:
                raise DataError(f"{src} holds no train/val/test table or shard descriptor")
            sources = {s: open_table(src, s, **read_kwargs) for s in splits}
        else:
            split = cfg.split or src.name.split(".")[0]
            sources = {split: open_table(src, split, **read_kwargs)}
        for split, table in sources.items():
            if cfg.to == "shards":
                if not isinstance(table, PairTable):
                    raise DataError(f"{cfg.src}: split '{split}' is already stored as shards")
                result = write_shards(table, out, split, cfg.samples_per_shard)
                summary["splits"][split] = {"kept": len(result), "skipped": _merge(table.skipped, result.skipped),
                                            "shards": len(result.shards), "fingerprint": result.fingerprint()}
            else:
                if not isinstance(table, ShardTable):
                    raise DataError(f"{cfg.src}: split '{split}' is already a CSV table")
                result_csv = shards_to_csv(table, out, split)
                summary["splits"][split] = {"kept": len(result_csv), "skipped": dict(table.skipped),
                                            "fingerprint": result_csv.fingerprint()}
        meta = (src if src.is_dir() else src.parent) / "dataset.json"
        if meta.is_file() and meta.resolve() != (out / "dataset.json").resolve():
            shutil.copyfile(meta, out / "dataset.json")
    else:
        # Foreign tar shards: index them (to=index), or index into OUT then extract (to=csv).
        if cfg.to == "shards":
            raise DataError(f"{cfg.src} is already tar shards; use --to index or --to csv")
        split = cfg.split or "train"
        shards = expand_shards(cfg.src)
        table = index_shards(shards, out / f"{split}.shards.json", split, label_fields=cfg.label_fields,
                             workers=cfg.workers, progress=cfg.progress)
        entry: dict[str, Any] = {"kept": len(table), "skipped": dict(table.skipped), "shards": len(shards),
                                 "fingerprint": table.fingerprint()}
        if cfg.to == "csv":
            entry["fingerprint"] = shards_to_csv(table, out, split).fingerprint()
        summary["splits"][split] = entry
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "convert_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    merged = dict(a)
    for k, v in b.items():
        merged[k] = merged.get(k, 0) + v
    return merged
