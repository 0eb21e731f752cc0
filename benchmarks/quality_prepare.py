"""Quality benchmark, part 2 of 5: the data set, the teacher banks and the neighbour tables.

Every step is skipped when its output is complete; each runs in its own process
(quality_run.run_stage). A neighbour variant is a second table over a bank, searched with
other options and scored by its recall@1 against the exact table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from quality_plan import APT_PACKAGES, SUBSET_SEED, BenchError, STAGE_TIMINGS, _read_json, subset_dir_for, subset_rows  # noqa: E402
from quality_run import run_stage  # noqa: E402


def _worker_data(p: dict[str, Any]) -> dict[str, Any]:
    if p["kind"] == "openclipart":
        from clip_ping.data.openclipart import OpenClipartConfig, convert_openclipart

        out = Path(p["out"])
        partial = out.exists() and any(out.iterdir())  # interrupted earlier (the summary is written last)
        opts = {k: v for k, v in p["options"].items()}
        summary = convert_openclipart(OpenClipartConfig(out=str(out), overwrite=partial, **opts))
        return {"pairs": summary["per_split"], "classes": summary["classes"], "skipped": summary["skipped"]}
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    generate_synthetic(SynthConfig(out=p["out"], **p["options"]), progress=p["progress"])
    return {}


def _worker_extract(p: dict[str, Any]) -> dict[str, Any]:
    from clip_ping.banks import ExtractConfig, extract_banks

    extract_banks(ExtractConfig(data=p["data"], out=p["out"], image_teacher=p["image_teacher"],
                                text_teacher=p["text_teacher"], progress=p["progress"], **p["options"]))
    manifest = json.loads((Path(p["out"]) / "manifest.json").read_text())
    return {"count": manifest.get("count"), "dims": manifest.get("dims") or
            {k: manifest.get(k) for k in ("image_dim", "text_dim") if k in manifest}}


def _worker_neighbors(p: dict[str, Any]) -> dict[str, Any]:
    from clip_ping.knn import NeighborsConfig, build_neighbors

    path = build_neighbors(NeighborsConfig(banks=p["banks"], k=p["k"], progress=p["progress"], overwrite=p["overwrite"],
                                           **p.get("options", {})))
    info = json.loads(Path(path).read_text())
    return {"k": info.get("k"), "method": info.get("method"), "mean_top1_score": info.get("mean_top1_score")}


def top1_recall(exact_bank: Path, other_bank: Path) -> dict[str, float]:
    """Recall@1 of a second neighbour table against the exact one, per side. A row counts as found when
    its top-1 score reaches the exact top-1 score (1e-5): tied neighbours (features equal to float
    precision, 18 % of OpenClipart v2's image rows) are equally right, whichever id a search returns."""
    import numpy as np

    out = {}
    for side in ("image", "text"):
        exact = np.load(exact_bank / f"neighbors_{side}_scores.npy")[:, 0]
        found = np.load(other_bank / f"neighbors_{side}_scores.npy")[:, 0]
        out[side] = round(float(np.mean(found >= exact - 1e-5)), 4)
    return out


def ensure_openclipart_installed(root: Path) -> None:
    if (root / "png").is_dir() and (root / "svg").is_dir():
        return
    cmd = "apt-get update && apt-get install -y " + " ".join(APT_PACKAGES)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"[quality] OpenClipart not found under {root}; installing it: {cmd}", flush=True)
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *APT_PACKAGES]):
            if subprocess.run(argv, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode != 0:
                raise BenchError(f"'{' '.join(argv)}' failed; install the packages yourself: sudo {cmd}")
        if (root / "png").is_dir() and (root / "svg").is_dir():
            return
    raise BenchError(f"OpenClipart not found under {root}; install it with: sudo {cmd} "
                     "(or use --data synth)")


def prepare(prof: dict[str, Any], plan: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """Data set, banks, neighbours; returns the stage records (timings kept next to the outputs)."""
    progress = sys.stderr.isatty()
    data_dir = Path(plan["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    records_path = data_dir / STAGE_TIMINGS
    records = _read_json(records_path) or {}

    def record(key: str, result: dict[str, Any] | None) -> None:
        if result is not None:
            records[key] = result
            records_path.write_text(json.dumps(records, indent=2))

    # data set
    if prof["data_name"] == "openclipart":
        complete = (data_dir / "openclipart_summary.json").is_file()
        if not complete:
            ensure_openclipart_installed(Path(prof["data_options"].get("root", "/usr/share/openclipart")))
        payload = {"kind": "openclipart", "out": str(data_dir), "options": prof["data_options"]}
    else:
        complete = all((data_dir / f).is_file() for f in ("dataset.json", "train.csv", "val.csv", "test.csv"))
        payload = {"kind": "synth", "out": str(data_dir), "options": prof["data_options"], "progress": progress}
    if complete:
        print(f"[quality] data: {data_dir} is complete, kept", flush=True)
    else:
        record("data", run_stage("data", payload, "data", state_dir))

    for subset, fraction in plan.get("subsets", {}).items():
        write_train_subset(data_dir, fraction)
        print(f"[quality] train subset {fraction:g}: {subset}", flush=True)

    # banks and neighbours, one pair per bank in use (an image teacher, or a setting's own extraction options)
    for name, bank in plan["banks"].items():  # name: the teacher, plus the bank's own options (bank_name_for)
        bank = Path(bank)
        spec = plan["bank_specs"][name]
        if (bank / "manifest.json").is_file():
            print(f"[quality] extract {name}: {bank} is complete, kept", flush=True)
        else:
            record(f"extract:{name}", run_stage("extract", {
                "data": spec.get("data", str(data_dir)), "out": str(bank), "image_teacher": spec["image_teacher"],
                "text_teacher": prof["text_teacher"], "progress": progress, "options": spec["extract"]},
                f"extract-{name}", state_dir))
        info = _read_json(bank / "neighbors.json") or {}
        if _neighbors_fresh(info, bank, prof["neighbor_k"]):
            print(f"[quality] neighbours {name}: k={info['k']} in {bank}, kept", flush=True)
        else:
            record(f"neighbors:{name}", run_stage("neighbors", {
                "banks": str(bank), "k": prof["neighbor_k"], "progress": progress,
                "overwrite": bool(info)}, f"neighbors-{name}", state_dir))

    for variant, spec in plan.get("neighbor_variants", {}).items():
        key = f"neighbors:{Path(variant).name}"
        record(key, prepare_neighbor_variant(Path(variant), spec, prof["neighbor_k"], records.get(key), state_dir,
                                             progress))
    return records


def write_train_subset(data_dir: Path, fraction: float) -> Path:
    """A data folder holding ``fraction`` of ``data_dir``'s train rows (`subset_rows`) and everything else
    of it (images, val and test tables, dataset.json) as links, so its banks and neighbours are built on the
    subset's own rows. Written once: a folder with its ``subset.json`` is complete and kept."""
    import csv

    out = subset_dir_for(data_dir, fraction)
    if (out / "subset.json").is_file():
        return out
    with open(data_dir / "train.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    keep = subset_rows(len(rows), fraction)
    out.mkdir(parents=True, exist_ok=True)
    for entry in data_dir.iterdir():  # the full set's banks, timings and image caches stay its own
        if entry.name == "train.csv" or entry.name.startswith(("banks", "quality_timing", "train.")):
            continue
        if not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry.resolve())
    with open(out / "train.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows[i] for i in keep)
    (out / "subset.json").write_text(json.dumps({"source": str(data_dir), "fraction": fraction, "seed": SUBSET_SEED,
                                                 "rows": len(keep), "of_rows": len(rows)}, indent=2))
    return out


def _neighbors_fresh(info: dict[str, Any], bank: Path, k: int) -> bool:
    """Whether a neighbour table (its ``neighbors.json`` ``info``) is of ``bank``'s features, with at least k."""
    fp = (_read_json(bank / "manifest.json") or {}).get("fingerprint")
    return bool(info and fp and info.get("bank_fingerprint") == fp and int(info.get("k", 0)) >= k)


def prepare_neighbor_variant(variant: Path, spec: dict[str, Any], k: int, done: dict[str, Any] | None,
                             state_dir: Path, progress: bool = False) -> dict[str, Any]:
    """A second neighbour table over a bank (``spec``: source bank, search options): the bank's
    features and manifest linked, its own search, and its recall@1 against the source's exact table.
    ``done`` is the earlier record, returned as is when the table is still that bank's."""
    source = Path(spec["source"])
    variant.mkdir(exist_ok=True)
    for f in source.iterdir():  # the bank's features and manifest, shared; the neighbour files its own
        if not f.name.startswith("neighbors") and not (variant / f.name).exists():
            (variant / f.name).symlink_to(f.resolve())
    info = _read_json(variant / "neighbors.json") or {}
    if done and _neighbors_fresh(info, source, k):
        print(f"[quality] neighbours {variant.name}: kept", flush=True)
        return done
    result = run_stage("neighbors", {"banks": str(variant), "k": k, "progress": progress, "overwrite": bool(info),
                                     "options": spec["options"]}, f"neighbors-{variant.name}", state_dir)
    result["top1_recall_vs_exact"] = top1_recall(source, variant)
    print(f"[quality] neighbours {variant.name}: recall@1 vs exact {result['top1_recall_vs_exact']}", flush=True)
    return result
