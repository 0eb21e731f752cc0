"""``dataset.json``: a data set's name and zero-shot tasks.

``dataset.json`` names the zero-shot classification tasks::

    {
      "name": "synth-shapes",
      "tasks": {
        "shape": {"column": "shape",
                  "classes": ["circle", "square", ...],
                  "templates": ["a picture of a {} shape.", "a drawing of a {}."]},
        ...
      }
    }

``column`` is the label column holding the class name of each row, ``classes``
lists every class (their order fixes the class ids), and ``templates`` are the
prompts, each with one ``{}`` replaced by the class name. Without
``dataset.json``, `read_dataset_info` makes one task per label column, with the
classes found in the tables and `DEFAULT_TEMPLATES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from .pairs import DEFAULT_TEMPLATES
from .table import open_table, stored_splits


def read_dataset_info(data_dir: str | Path) -> dict[str, Any]:
    """The data set's name and zero-shot tasks (see the module docstring for the format).

    Reads ``DIR/dataset.json`` when present; otherwise one task per label column of
    the split tables, classes sorted, prompts from `DEFAULT_TEMPLATES`.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    if meta_path.is_file():
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path} is not valid JSON: {exc}") from None
        return _validate_info(info, meta_path)

    if not data_dir.is_dir():
        raise DataError(f"data set folder not found: {data_dir}")
    splits = stored_splits(data_dir)
    if not splits:
        raise DataError(f"data set folder {data_dir} has no dataset.json and no train/val/test table")
    classes: dict[str, set[str]] = {}
    for split in splits:
        table = open_table(data_dir, split, check_files=False)
        for column, values in table.labels.items():
            classes.setdefault(column, set()).update(v for v in values if v)
    tasks = {
        column: {"column": column, "classes": sorted(values), "templates": list(DEFAULT_TEMPLATES)}
        for column, values in classes.items()
        if len(values) >= 2  # a column with a single value is not a classification task
    }
    return {"name": data_dir.resolve().name, "tasks": tasks}


def _validate_info(info: Any, where: Path) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise DataError(f"{where} must hold a JSON object")
    tasks = info.get("tasks", {})
    if not isinstance(tasks, dict):
        raise DataError(f"{where}: 'tasks' must map task names to {{column, classes, templates}}")
    for name, task in tasks.items():
        if not isinstance(task, dict):
            raise DataError(f"{where}: task '{name}' must be an object")
        task.setdefault("column", name)
        task.setdefault("templates", list(DEFAULT_TEMPLATES))
        classes = task.get("classes")
        if not isinstance(classes, list) or len(classes) < 2:
            raise DataError(f"{where}: task '{name}' needs a list of at least 2 classes")
        bad = [t for t in task["templates"] if not isinstance(t, str) or "{}" not in t]
        if bad or not task["templates"]:
            raise DataError(f"{where}: task '{name}': every template must contain '{{}}' (got {bad[:1] or 'none'})")
    info.setdefault("name", where.parent.name)
    info["tasks"] = tasks
    return info
