"""What zero-shot classification asks: the tasks (class names, prompts) of a data set or of user files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError
from ..io import read_text


def read_templates_file(path: str | Path) -> list[str]:
    """Prompt templates, one per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"templates file not found: {path}")
    lines = [line.strip() for line in read_text(path).splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"templates file {path}: every template needs a {{}} for the class name (got {bad[0]!r})")
    if not templates:
        raise ConfigError(f"templates file {path} holds no template")
    return templates


def read_tasks_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Zero-shot tasks from a JSON/YAML file: ``{"tasks": {task: {...}}}`` or ``{task: {...}}``.

    A task has ``classes`` (the label values), optional ``column`` (default: the
    task name), ``templates`` and ``names`` (the words put in the prompts, one per
    class, for labels that are codes rather than words).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tasks file not found: {path}")
    try:
        data = yaml.safe_load(read_text(path))  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ConfigError(f"tasks file {path} is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        data = data["tasks"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"tasks file {path} must map task names to {{classes, column, templates}}")
    tasks = {}
    for name, task in data.items():
        if not isinstance(task, dict) or not isinstance(task.get("classes"), list) or len(task["classes"]) < 2:
            raise ConfigError(f"tasks file {path}: task '{name}' needs a list of at least 2 classes")
        names = task.get("names")
        if names is not None and (not isinstance(names, list) or len(names) != len(task["classes"])):
            raise ConfigError(f"tasks file {path}: task '{name}': 'names' must list one prompt name per class")
        templates = task.get("templates")
        if templates is not None and (not templates or any("{}" not in str(t) for t in templates)):
            raise ConfigError(f"tasks file {path}: task '{name}': every template needs a {{}} for the class name")
        tasks[str(name)] = {"column": str(task.get("column", name)), "classes": [str(c) for c in task["classes"]],
                            **({"templates": [str(t) for t in templates]} if templates else {}),
                            **({"names": [str(n) for n in names]} if names else {})}
    return tasks


def resolve_tasks(
    data_dir: str | Path,
    tasks: dict[str, dict[str, Any]] | None = None,
    templates: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The zero-shot tasks to run: ``tasks`` if given, else the data set's; ``templates`` replace every task's."""
    from ..data.dataset_info import DEFAULT_TEMPLATES, read_dataset_info

    resolved = {}
    for name, task in (tasks if tasks is not None else read_dataset_info(data_dir).get("tasks", {})).items():
        task = dict(task)
        task.setdefault("column", name)
        task["templates"] = list(templates) if templates else list(task.get("templates") or DEFAULT_TEMPLATES)
        resolved[name] = task
    return resolved
