"""The suite file of `clip-ping eval --suite FILE.yaml`: a list of evaluation tasks on the field's layouts.

A suite file::

    tasks:
      - name: imagenet            # zero-shot on ImageNet-style class folders
        kind: zeroshot
        layout: folders
        path: /data/imagenet      # /data/imagenet/val/<synset>/<image>
        split: val
        classnames: imagenet      # open_clip's ImageNet names; or a file; default: the folders'
        templates: openai         # OpenAI's 80 prompts; simple; a file; default: the layout's own
      - name: flickr30k
        kind: retrieval
        layout: karpathy
        path: /data/flickr30k/dataset_flickr30k.json
        images: /data/flickr30k/flickr30k-images
      - name: cifar10
        kind: zeroshot
        layout: wds               # clip_benchmark's WebDataset eval shards
        path: /data/wds_cifar10
      - name: pets-probe
        kind: linear_probe        # train split features, C chosen on val (or 20% of train)
        layout: folders
        path: /data/pets

``layout: data`` is a clip-ping data set folder (tables or image folders, as
`clip-ping eval --data`). Relative paths are relative to the suite file.
Layouts are read by `clip_ping.evaluation.layouts`. Both runners take their
tasks from here: clip-ping's own (`suite`) and clip_benchmark's (`clip_benchmark_run`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError
from .layouts import ClassificationSet, RetrievalSet, read_class_folders, read_karpathy_json, read_wds

KINDS = ("zeroshot", "retrieval", "linear_probe")
LAYOUTS = {"folders": ("zeroshot", "linear_probe"), "karpathy": ("retrieval",),
           "wds": ("zeroshot", "retrieval", "linear_probe"), "data": KINDS}


@dataclass
class SuiteTask:
    name: str
    kind: str
    layout: str
    path: str
    split: str = "test"
    images: str | None = None        # karpathy: the image folder
    classnames: str | None = None
    templates: str | None = None
    train_split: str = "train"       # linear probe
    val_split: str = "val"           # linear probe; absent: 20% of the train sample


def read_suite(path: str | Path) -> list[SuiteTask]:
    """The tasks of a suite file; every mistake is one `ConfigError` line naming the task and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"suite file {path} must hold a non-empty 'tasks' list")
    known = {f.name for f in fields(SuiteTask)}
    tasks, names = [], set()
    for i, entry in enumerate(entries):
        label = f"suite file {path}, task {entry.get('name', i + 1) if isinstance(entry, dict) else i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: must be a mapping of {sorted(known)}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"{label}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        for key in ("kind", "layout", "path"):
            if not entry.get(key):
                raise ConfigError(f"{label}: key '{key}' is required")
        entry = {k: (str(v) if v is not None else None) for k, v in entry.items()}
        entry.setdefault("name", f"{entry['layout']}-{entry['kind']}-{i + 1}")
        if entry["layout"] not in LAYOUTS:
            raise ConfigError(f"{label}: layout '{entry['layout']}' is not one of {', '.join(LAYOUTS)}")
        if entry["kind"] not in LAYOUTS[entry["layout"]]:
            raise ConfigError(f"{label}: kind '{entry['kind']}' is not one of {', '.join(LAYOUTS[entry['layout']])} "
                              f"for layout '{entry['layout']}'")
        if entry["name"] in names:
            raise ConfigError(f"{label}: the name '{entry['name']}' is used twice")
        names.add(entry["name"])
        named = {"classnames": ("imagenet",), "templates": ("openai", "simple")}  # not files
        for key in ("path", "images", "classnames", "templates"):  # files relative to the suite file
            value = entry.get(key)
            if value and value not in named.get(key, ()) and not Path(value).is_absolute():
                entry[key] = str(path.parent / value)
        tasks.append(SuiteTask(**entry))
    return tasks


def open_classification(task: SuiteTask, split: str) -> ClassificationSet:
    """The classification set of a zero-shot or probe task (class folders or clip_benchmark shards)."""
    if task.layout == "folders":
        return read_class_folders(task.path, split, task.classnames, task.templates)
    result = read_wds(task.path, split, task.templates, task.classnames)
    if not isinstance(result, ClassificationSet):
        raise DataError(f"task '{task.name}': {task.path} is a retrieval data set (dataset_type.txt), not classification")
    return result


def open_retrieval(task: SuiteTask) -> RetrievalSet:
    """The image-caption set of a retrieval task (Karpathy JSON or clip_benchmark shards)."""
    result = (read_karpathy_json(task.path, task.images, task.split) if task.layout == "karpathy"
              else read_wds(task.path, task.split))
    if not isinstance(result, RetrievalSet):
        raise DataError(f"task '{task.name}': {task.path} is a classification data set; "
                        "a retrieval one has dataset_type.txt saying 'retrieval'")
    return result
