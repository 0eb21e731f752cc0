"""The model card (README.md) of an exported model, generated from its run.

Hugging Face and open_clip show a model folder's README.md as its card; the
front matter tags it as an open_clip zero-shot image classifier. The body says
what the run was: its training data, its method and settings (the run's
``config.yaml`` as saved in the checkpoint) and the evaluation table of the
run folder's ``eval.json`` and ``suite.json`` when they exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

METHOD_LINES = {
    "clip": "plain CLIP (symmetric InfoNCE on image-caption pairs)",
    "clip-ping": "CLIP-PING: the CLIP loss plus nearest-neighbour (NN) and cross nearest-neighbour (XNN) "
                 "guidance from frozen teacher feature banks",
}
SETTINGS = ("method", "model", "init_from", "batch_size", "epochs", "steps", "lr", "weight_decay", "warmup_steps",
            "lambda_nn", "lambda_xnn", "neighbor_topk", "neighbor_source", "targets", "seed")


def _eval_rows(run_dir: Path | None) -> list[tuple[str, str, float]]:
    """(task, metric, value) of the run's eval.json (clip-ping eval) and suite.json (clip-ping eval --suite).
    A file that is cut or not in the shape clip-ping writes stops the export with one line naming it."""
    rows: list[tuple[str, str, float]] = []
    if run_dir is None:
        return rows
    for name, read in (("eval.json", _eval_file_rows), ("suite.json", _suite_file_rows)):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            rows += read(json.loads(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); re-run clip-ping eval, or move it away to export "
                            "without an evaluation table") from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(f"{path} is not an evaluation clip-ping wrote (missing or odd entry {exc}); re-run "
                            "clip-ping eval, or move it away to export without an evaluation table") from None
    return rows


def _eval_file_rows(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    rows: list[tuple[str, str, float]] = []
    for task, scores in result.get("zeroshot", {}).items():
        rows += [(f"zero-shot {task}", f"top-{k[3:]} %", float(scores[k])) for k in ("top1", "top5") if k in scores]
    for direction, scores in result.get("retrieval", {}).items():
        if isinstance(scores, dict):
            rows += [(f"retrieval {direction.replace('_', ' ')}", k, float(v)) for k, v in scores.items()
                     if k.startswith("R@")]
    for task, scores in result.get("linear_probe", {}).items():
        rows.append((f"linear probe {task}", "accuracy %", float(scores["accuracy"])))
    return rows


def _suite_file_rows(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    return [(str(r["task"]), str(r["metric"]), float(r["value"])) for r in result["table"]]


def model_card(model_name: str, state: dict[str, Any], run_dir: Path | None) -> str:
    """README.md text for an exported checkpoint ``state`` (its ``config`` is the training config)."""
    config = state.get("config") or {}
    method = config.get("method", state.get("method", "unknown"))
    lines = [
        "---",
        "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, open_clip, clip-ping]",
        "---",
        "",
        f"# {model_name}, trained with clip-ping",
        "",
        "## Training data",
        "",
        f"- data: `{config.get('data', 'unknown')}` (train split)",
    ]
    if config.get("banks"):
        lines.append(f"- teacher feature banks: `{config['banks']}`")
    start = (f"Initialised from `{config['init_from']}` (pretrained open_clip weights)." if config.get("init_from")
             else f"Initialised from random weights (seed {config.get('seed', 'unknown')}).")
    lines += ["", "## Method and settings", "", f"Method: {METHOD_LINES.get(method, method)}.", "", start, "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {config[key]} |" for key in SETTINGS if key in config]
    lines += [f"| steps trained | {state.get('step', 'unknown')} |", ""]
    rows = _eval_rows(run_dir)
    lines += ["## Evaluation", ""]
    if rows:
        lines += ["| task | metric | value |", "|---|---|---:|"]
        lines += [f"| {task} | {metric} | {value:.2f} |" for task, metric, value in rows]
    else:
        lines.append("Not evaluated yet: run `clip-ping eval` (or `clip-ping eval --suite`) on the run folder, then export again.")
    lines += ["", "## Use", "", "```python", "import open_clip", "",
              "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH_TO_THIS_FOLDER')",
              "tokenizer = open_clip.get_tokenizer('local-dir:PATH_TO_THIS_FOLDER')", "```", ""]
    return "\n".join(lines)
