"""What clip-ping needs installed: version checks of the heavy packages and the optional extras.

clip-ping installs into environments that already hold a torch (often a CUDA
build), so torch and torchvision are ranges in pyproject.toml, not pins. That
lets a user end up with a torchvision built for another torch, or a package
older than clip-ping was tested with, which otherwise surfaces as a cryptic
error deep inside an import. `check_environment` reads the installed versions
from package metadata (no import, so it is cheap) and reports every problem
in one line before any work starts.

Optional features live in extras (``pip install 'clip-ping[EXTRA]'``);
`require` gives the one-line error naming the extra when one is missing.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata

from .errors import ClipPingError

# Lowest versions clip-ping is tested with; pyproject.toml states the same
# (tests/test_environment.py checks that the two agree). CI runs the pipeline and the
# version-sensitive tests under the lowest torch pair too (`make test-floor`,
# ci/constraints-floor.txt), and everything under the Makefile's pair.
MINIMUM_VERSIONS: dict[str, str] = {
    "torch": "2.4",
    "torchvision": "0.19",
    "open-clip-torch": "3.0",
    "timm": "1.0",
    "numpy": "1.24",
}

# extra -> (module that proves it is installed, what it enables)
EXTRAS: dict[str, tuple[str, str]] = {
    "teachers": ("sentence_transformers", "the built-in teachers (EfficientNet-Lite0, all-MiniLM-L6-v2)"),
    "faiss-cpu": ("faiss", "neighbour search"),
    "probe": ("sklearn", "the linear probe"),
    "report": ("matplotlib", "report plots"),
    "tensorboard": ("tensorboard", "TensorBoard logging"),
    "wandb": ("wandb", "Weights & Biases logging"),
    "clip-benchmark": ("clip_benchmark", "evaluation with clip_benchmark"),
}


class SetupError(ClipPingError):
    """An installed package is missing, too old, or does not match its partner."""


def _release(version: str) -> tuple[int, ...]:
    """(2, 14, 1) from "2.14.1+cu128" or "2.15.0.dev20260101"; local and pre-release parts ignored."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in numbers.group(0).split(".")) if numbers else ()


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def torchvision_partner(torch_version: str) -> tuple[int, int] | None:
    """The torchvision release (major, minor) built for a torch 2.x: 0.(x + 15), e.g. 2.14 -> 0.29."""
    release = _release(torch_version)
    if len(release) < 2 or release[0] != 2:
        return None
    return 0, release[1] + 15


SUPPORTED_PAIRS = (f"torch {MINIMUM_VERSIONS['torch']} or newer below 3, each with the torchvision made for it "
                   f"(0.N+15 for torch 2.N: {MINIMUM_VERSIONS['torchvision']} for {MINIMUM_VERSIONS['torch']})")

# transformers 5 switches its torch support off below this torch (the text teacher's import then fails)
TRANSFORMERS_5_NEEDS_TORCH = "2.6"


def _torch_pair_problem(torch_version: str | None, vision_version: str | None) -> str | None:
    """One sentence naming both versions and the supported range, where the pair is not supported."""
    if torch_version is None:
        return f"torch is not installed (clip-ping supports {SUPPORTED_PAIRS})"
    partner = torchvision_partner(torch_version)
    if vision_version is None:
        wanted = f"torchvision {partner[0]}.{partner[1]}.*" if partner else "torchvision"
        return f"torchvision is not installed (install {wanted}, the release made for torch {torch_version})"
    outside = not _release(MINIMUM_VERSIONS["torch"]) <= _release(torch_version) < (3,)
    mismatched = partner is not None and _release(vision_version)[:2] != partner
    if not (outside or mismatched):
        return None
    fix = f"; for torch {torch_version} install torchvision {partner[0]}.{partner[1]}.*" if partner and not outside else ""
    return f"torch {torch_version} with torchvision {vision_version} is not a supported pair: clip-ping supports {SUPPORTED_PAIRS}{fix}"


def environment_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """Every problem with the installed heavy packages, as short sentences (empty: all good).

    ``versions`` maps distribution names to installed versions (None: absent);
    by default they are read from the environment's package metadata.
    """
    if versions is None:
        versions = {name: installed_version(name) for name in (*MINIMUM_VERSIONS, "transformers")}
    torch_version, vision_version = versions.get("torch"), versions.get("torchvision")
    pair = _torch_pair_problem(torch_version, vision_version)
    problems = [pair] if pair else []
    for name, lowest in MINIMUM_VERSIONS.items():
        have = versions.get(name)
        if name in ("torch", "torchvision"):
            continue
        if have is None:
            problems.append(f"{name} is not installed (need >= {lowest})")
        elif _release(have) < _release(lowest):
            problems.append(f"{name} {have} is older than {lowest}, the lowest version clip-ping is tested with")
    transformers = versions.get("transformers")
    if (transformers and torch_version and _release(transformers) >= (5,)
            and _release(torch_version) < _release(TRANSFORMERS_5_NEEDS_TORCH)):
        problems.append(f"transformers {transformers} needs torch {TRANSFORMERS_5_NEEDS_TORCH} or newer and turns its "
                        f"torch support off beside torch {torch_version}: install 'transformers<5'")
    return problems


def check_environment(versions: dict[str, str | None] | None = None) -> None:
    """Raise one `ClipPingError` listing every problem `environment_problems` finds."""
    problems = environment_problems(versions)
    if problems:
        raise SetupError("this environment cannot run clip-ping: " + "; ".join(problems))


def has_extra(extra: str) -> bool:
    return importlib.util.find_spec(EXTRAS[extra][0]) is not None


def require(extra: str) -> None:
    """Raise a one-line error when the packages of ``extra`` are not installed."""
    if not has_extra(extra):
        module, feature = EXTRAS[extra]
        how = f"pip install 'clip-ping[{extra}]'"
        if extra == "faiss-cpu":  # one FAISS build or the other, never both (see README, "Install")
            how += " (or 'clip-ping[faiss-gpu]' on a CUDA machine)"
        raise SetupError(f"{feature} needs {module}, which is not installed: {how}")
