"""Time `make venv` from nothing: pip against uv, as a user on a fresh machine meets it.

    .venv/bin/python benchmarks/archive/bench_venv.py --rounds 3

Each round clones this repository (committed HEAD) into a temporary folder and runs
`make venv INSTALLER=pip` and `make venv INSTALLER=uv` there, in alternating order,
each with an empty package cache (``PIP_NO_CACHE_DIR``, a new ``UV_CACHE_DIR``),
so every wheel is downloaded and unpacked as on a fresh machine. The venv is then
checked (``import clip_ping.cli, torch, open_clip``) and deleted (about 6.5 GB each).
Results: ``benchmarks/results/venv_<tag>.json``.

Finished: it chose uv for `make venv` (commit 26955bf); its results stay in benchmarks/results/venv_*.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
from _common import print_table, stats, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def build(installer: str, work: Path) -> dict[str, float | str]:
    clone = work / f"clone-{installer}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_", "PIP_NO_CACHE"))}
    env["PIP_NO_CACHE_DIR"] = "1"
    env["UV_CACHE_DIR"] = str(work / f"uv-cache-{installer}")
    t0 = time.perf_counter()
    done = subprocess.run(["make", "venv", f"INSTALLER={installer}", "PYTHON=python3"], cwd=clone, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"make venv INSTALLER={installer} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    if installer == "uv" and "installing with pip" in done.stdout.splitlines():  # the echo's output, not the recipe
        raise SystemExit("uv could not install here; make fell back to pip, so this round would time pip twice")
    check = subprocess.run([str(clone / ".venv/bin/python"), "-c",
                            "import clip_ping.cli, torch, open_clip; print(torch.__version__)"],
                           capture_output=True, text=True, check=True)
    shutil.rmtree(clone)
    shutil.rmtree(work / f"uv-cache-{installer}", ignore_errors=True)
    return {"seconds": seconds, "torch": check.stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="build")
    ap.add_argument("--work", type=Path, default=None, help="folder for the clones (default: a temporary one)")
    args = ap.parse_args(argv)

    installers = ["pip", "uv"]
    seconds: dict[str, list[float]] = {name: [] for name in installers}
    versions: set[str] = set()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for r in range(args.rounds):
            for name in (installers if r % 2 == 0 else installers[::-1]):
                result = build(name, Path(tmp))
                seconds[name].append(float(result["seconds"]))
                versions.add(str(result["torch"]))
                print(f"round {r}: {name} {result['seconds']:.1f} s", flush=True)
    summary = {name: stats(s) for name, s in seconds.items()}
    ratios = [p / u for p, u in zip(seconds["pip"], seconds["uv"])]
    rows = [[name, summary[name]["median"], summary[name]["min"], summary[name]["max"]] for name in installers]
    print_table(rows, ["installer", "median s", "min s", "max s"], title="make venv from nothing")
    print(f"pip / uv per round: {', '.join(f'{x:.2f}' for x in ratios)}; torch {', '.join(sorted(versions))}")
    path = write_json(f"venv_{args.tag}", {"seconds": seconds, "summary": summary, "pip_over_uv": ratios,
                                           "torch": sorted(versions)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
