"""`clip-ping neighbors show`: look at the neighbours before training with them.

Writes an HTML page of random samples beside their image-side neighbour p_i
(whose image is the image's NN target and whose caption is its XNN target) and
their text-side neighbour q_i (caption: the caption's NN target, image: its XNN
target), and measures, for every label column of the data, how often a sample's
neighbour has the same label as the sample (against the chance rate).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import atomic_write_text, claim_files
from .table import load_neighbors

log = logging.getLogger(__name__)


@dataclass
class ShowConfig(Config):
    """Options of `clip-ping neighbors show`."""

    data: str = option("", "what the bank was built from: a pairs table (CSV/TSV), a shard descriptor, or a data set "
                       "folder (its train split: table, shards or image folders)")
    banks: str | None = option(None, "bank folder with neighbours (default: <data folder>/banks)")
    out: str | None = option(None, "HTML page to write (default: <banks>/neighbors.html)")
    # not "n": `--n` would be an ambiguous abbreviation of `clip-ping neighbors --nprobe/--no-...`
    samples: int = option(50, "random samples shown on the page", bounds=">= 1")
    seed: int = option(0, "seed of the random choice of samples", bounds="[0, 4294967295]")
    embed: bool = option(True, "embed thumbnails in the page (self-contained) instead of linking the image files")
    thumb: int = option(160, "thumbnail size in pixels (embedded images)", bounds="[16, 1024]")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("neighbors show needs --data (the pairs CSV/TSV or data set folder of the bank)")


def show_neighbors(cfg: ShowConfig) -> dict[str, Any]:
    """CLI entry: write the page, log the label agreement, return the diagnostics."""
    data = Path(cfg.data)
    bank_dir = Path(cfg.banks) if cfg.banks else (data if data.is_dir() else data.parent) / "banks"
    out = Path(cfg.out) if cfg.out else bank_dir / "neighbors.html"
    result = write_neighbor_page(data, bank_dir, out, n=cfg.samples, seed=cfg.seed, embed=cfg.embed, thumb=cfg.thumb)
    for line in format_agreement(result).splitlines():
        log.info(line)
    return result


def label_agreement(labels: Mapping[str, Sequence[str]], image_nn: np.ndarray, text_nn: np.ndarray,
                    rows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Per label column: share of rows whose top-1 (and top-k) neighbour has the same label.

    ``image_nn`` / ``text_nn`` are the N x k tables; ``rows`` restricts the rows counted
    (e.g. valid ones). Rows with an empty label are not counted. ``chance`` is the rate
    for a neighbour drawn at random with the label frequencies of the data.
    """
    out: dict[str, dict[str, float]] = {}
    for column, values in labels.items():
        values = list(values)  # a compact column (shard index) becomes one list here, not N numpy lookups
        _, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        codes = codes.reshape(-1)
        known = np.array([bool(str(v).strip()) for v in values])
        counted = known if rows is None else known & np.isin(np.arange(len(values)), rows)
        if not counted.any():
            continue
        own = codes[counted][:, None]
        freq = np.bincount(codes[known]) / known.sum()
        out[column] = {
            "image_side_top1": float((codes[image_nn[counted, 0]] == own[:, 0]).mean()),
            "text_side_top1": float((codes[text_nn[counted, 0]] == own[:, 0]).mean()),
            "image_side_topk": float((codes[np.asarray(image_nn[counted])] == own).mean()),
            "text_side_topk": float((codes[np.asarray(text_nn[counted])] == own).mean()),
            "chance": float((freq**2).sum()),
            "rows": int(counted.sum()),
        }
    return out


def format_agreement(result: dict[str, Any]) -> str:
    """Human-readable lines for the label agreement of `write_neighbor_page`."""
    lines = [f"neighbour page: {result['html']} ({result['shown']} samples)"]
    for column, a in result["label_agreement"].items():
        lines.append(
            f"label '{column}': neighbour has the same label - image side {a['image_side_top1']:.1%}, "
            f"text side {a['text_side_top1']:.1%} (top-1; top-{result['k']}: {a['image_side_topk']:.1%} / "
            f"{a['text_side_topk']:.1%}; chance {a['chance']:.1%})"
        )
    if not result["label_agreement"]:
        lines.append("no label columns: no agreement to measure")
    return "\n".join(lines)


def write_neighbor_page(data: str | Path, bank_dir: str | Path, out_html: str | Path, n: int = 50,
                        seed: int = 0, embed: bool = True, thumb: int = 160) -> dict[str, Any]:
    """Write the HTML page of ``n`` random samples with p_i and q_i; return the diagnostics.

    ``data`` is what `open_table` opens (its train split). ``embed=True`` inlines JPEG
    thumbnails (base64); ``embed=False`` links the image files by paths relative to the
    page (images inside shards have no file to link: they are embedded).
    """
    from ..data.table import open_table

    table = open_table(data, "train")
    files = getattr(table, "filepaths", None)
    if not embed and files is None:
        log.info("neighbour page: %s holds its images in shards, so they are embedded", data)
        embed = True
    bank_dir = Path(bank_dir)
    neighbors = load_neighbors(bank_dir)
    if len(neighbors) != len(table):
        raise DataError(f"{data} has {len(table)} rows but the neighbours in {bank_dir} have {len(neighbors)}; "
                        "was the bank built from another table?")
    manifest_path = bank_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    data_fp = manifest.get("data_fingerprint") if isinstance(manifest, dict) else None
    if data_fp and data_fp != table.fingerprint():
        raise DataError(f"bank {bank_dir} was built for another data set than {data} (fingerprints differ)")
    valid_path = bank_dir / "valid.npy"
    valid = np.load(valid_path, mmap_mode="r") if valid_path.is_file() else np.ones(len(table), dtype=bool)
    valid_rows = np.flatnonzero(valid)

    rng = np.random.default_rng(seed)
    shown = np.sort(rng.choice(valid_rows, size=min(n, len(valid_rows)), replace=False))
    agreement = label_agreement(table.labels, neighbors.image, neighbors.text, rows=valid_rows)

    out_html = Path(out_html)
    claim_files(out_html.parent, "neighbour page", [out_html.name],  # never over a page of the user's
                legacy=lambda folder: _legacy_page(folder / out_html.name))
    cache: dict[int, str] = {}

    def image_src(i: int) -> str:
        if i not in cache:
            cache[i] = _thumbnail(table, i, thumb) if embed else _relative_url(files[i], out_html)
        return cache[i]

    def cell(i: int, own: int | None, score: float | None) -> str:
        labels = []
        for column, values in table.labels.items():
            same = own is not None and values[i] == values[own]
            cls = "same" if same else ("diff" if own is not None else "")
            labels.append(f'<span class="lab {cls}">{html.escape(column)}: {html.escape(values[i])}</span>')
        score_txt = f"#{i} &middot; cos {score:.3f}" if score is not None else f"#{i}"
        src = image_src(i)
        img = (f'<img src="{html.escape(src)}" alt="sample {i}" loading="lazy">' if src
               else '<div class="noimg">unreadable</div>')
        caption = html.escape(table.captions[i])
        return (f'<td>{img}<div class="cap">{caption}</div><div class="score">{score_txt}</div>'
                f"<div>{' '.join(labels)}</div></td>")

    rows_html = []
    for i in shown:
        i = int(i)
        p, q = int(neighbors.image[i, 0]), int(neighbors.text[i, 0])
        rows_html.append("<tr>" + cell(i, None, None)
                         + cell(p, i, float(neighbors.image_scores[i, 0]))
                         + cell(q, i, float(neighbors.text_scores[i, 0])) + "</tr>")

    result = {
        "html": str(out_html),
        "shown": int(len(shown)),
        "rows": len(table),
        "k": neighbors.k,
        "method": neighbors.info.get("method"),
        "mean_top1_score": {
            "image_side": float(np.asarray(neighbors.image_scores[valid_rows, 0]).mean()),
            "text_side": float(np.asarray(neighbors.text_scores[valid_rows, 0]).mean()),
        },
        "label_agreement": agreement,
    }
    atomic_write_text(out_html, _page(result, rows_html))
    return result


def _legacy_page(path: Path) -> list[str] | None:
    """``[name]`` when ``path`` is a neighbour page an earlier clip-ping wrote (its title says so)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(200)
    except OSError:
        return None
    return [path.name] if "<title>clip-ping neighbours</title>" in head else None


def _thumbnail(table: Any, i: int, size: int) -> str:
    """A base64 JPEG data URL of row i's image scaled to fit size x size ('' if unreadable)."""
    try:
        im = table.open_image(i)
    except (DataError, OSError) as exc:  # an unreadable image just shows as such on the page
        log.warning("neighbour page: cannot read the image of row %d (%s)", i, exc)
        return ""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _relative_url(path: str, page: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(page.parent))
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def _page(result: dict[str, Any], rows_html: list[str]) -> str:
    agreement_rows = "".join(
        f"<tr><td>{html.escape(col)}</td><td>{a['image_side_top1']:.1%}</td><td>{a['text_side_top1']:.1%}</td>"
        f"<td>{a['image_side_topk']:.1%}</td><td>{a['text_side_topk']:.1%}</td><td>{a['chance']:.1%}</td></tr>"
        for col, a in result["label_agreement"].items()
    ) or '<tr><td colspan="6">no label columns</td></tr>'
    k = result["k"]
    scores = result["mean_top1_score"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>clip-ping neighbours</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 6px; vertical-align: top; }}
table.pairs td {{ width: 260px; }}
img {{ max-width: 240px; max-height: 240px; display: block; margin-bottom: 4px; }}
.cap {{ font-size: 0.95em; }}
.score {{ color: #777; font-size: 0.8em; margin: 2px 0; }}
.lab {{ font-size: 0.75em; padding: 1px 4px; border-radius: 3px; background: #eee; margin-right: 3px; }}
.lab.same {{ background: #cdeccd; }} .lab.diff {{ background: #f5d0d0; }}
.noimg {{ width: 160px; height: 100px; background: #eee; color: #999; text-align: center; line-height: 100px; }}
</style></head><body>
<h1>Nearest neighbours (CLIP-PING)</h1>
<p>{result['shown']} random samples of {result['rows']}; neighbours searched with <b>{html.escape(str(result['method']))}</b>,
k={k}. Mean top-1 cosine: image side {scores['image_side']:.3f}, text side {scores['text_side']:.3f}.</p>
<p>The <b>image-side neighbour p</b> is found with the image teacher: its image is the NN target of the
sample's image, its caption the XNN target. The <b>text-side neighbour q</b> is found with the text teacher:
its caption is the NN target of the sample's caption, its image the XNN target.
Labels in green agree with the sample's, red differ.</p>
<h2>Label agreement (all valid samples)</h2>
<table><tr><th>label</th><th>image side, top-1</th><th>text side, top-1</th>
<th>image side, top-{k}</th><th>text side, top-{k}</th><th>chance</th></tr>{agreement_rows}</table>
<h2>Samples</h2>
<table class="pairs"><tr><th>sample</th><th>image-side neighbour p (NN / XNN of the image)</th>
<th>text-side neighbour q (NN / XNN of the caption)</th></tr>
{''.join(rows_html)}
</table></body></html>
"""
