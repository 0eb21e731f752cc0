# Quick start: `make demo` runs the whole pipeline on the built-in data,
# `make test` runs the test suite, under the pinned torch pair and under the
# lowest supported one. Both build their venvs first when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv venv-floor demo test test-main test-floor bench clean gpu-bundle

venv: $(STAMP)

# The tested torch/torchvision pair is pinned here (pyproject.toml only states ranges;
# see DEVELOPERS.md). uv installs it and the package about 2x faster than pip
# (parallel downloads and unpacking; BENCHMARKS.md, "Building the venv"). uv reads
# its own index settings, not pip.conf, so where it cannot install, pip does.
# `make venv INSTALLER=pip` skips uv. --compile-bytecode writes the .pyc files at
# install, as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing writes them
# later, and every process would compile open_clip, timm and transformers again.
PAIR := "torch==2.14.1" "torchvision==0.29.1"
PIP := $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check
UV := $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python
INSTALLER ?= uv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(PIP) uv && $(UV) $(PAIR) -e ".[all,test,bench]"; then :; else \
		echo "installing with pip"; $(PIP) $(PAIR) && $(PIP) -e ".[all,test,bench]"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clip-ping demo

# The lowest supported pair, torch 2.4.1 / torchvision 0.19.1, in its own venv, every package
# pinned by constraints/floor.txt (what a user at the floor installs); rebuilt from nothing when
# that file or pyproject.toml changes (from uv's cache that takes about a minute).
FLOOR := .venv-floor
FLOOR_STAMP := $(FLOOR)/.installed
FLOOR_PINS := constraints/floor.txt
FLOOR_PACKAGES := torch torchvision transformers setuptools -e ".[all,test]"

venv-floor: $(FLOOR_STAMP)

$(FLOOR_STAMP): $(FLOOR_PINS) pyproject.toml | $(STAMP)
	rm -rf $(FLOOR)
	$(PYTHON) -m venv $(FLOOR)
	if [ -x $(VENV)/bin/uv ] && $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(FLOOR)/bin/python \
		-c $(FLOOR_PINS) $(FLOOR_PACKAGES); then :; else echo "installing with pip"; \
		$(FLOOR)/bin/python -m pip install --quiet --disable-pip-version-check -c $(FLOOR_PINS) $(FLOOR_PACKAGES); fi
	touch $(FLOOR_STAMP)

# Both pairs: everything under the pinned pair, then the tests marked `floor` under the lowest.
test: test-main test-floor

# the lint and the type check first: they take seconds and name the line; the tests on
# one worker process per core (at most 4), one torch thread each (tests/conftest.py)
test-main: $(STAMP)
	$(VENV)/bin/ruff check clip_ping tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n auto --maxprocesses 4

# the pipeline end to end and the tests of what differs between torch releases (autocast and the
# gradient scaler, compilation, gradient checkpointing, the distributed gather, checkpoint loading)
test-floor: $(FLOOR_STAMP)
	$(FLOOR)/bin/python -m pytest -m floor -n auto --maxprocesses 4

clean:
	rm -rf runs .pytest_cache

# The wheels benchmarks/gpu_check.py needs beyond a stock CUDA image (benchmarks/gpu_bundle.txt),
# pinned, for CPython $(GPU_PYTHON) on manylinux x86-64, into the ignored folder $(GPU_BUNDLE).
# Carry that folder to the GPU node; there: python benchmarks/gpu_check.py --wheels $(GPU_BUNDLE)
GPU_PYTHON ?= 3.12
GPU_BUNDLE ?= gpu-bundle
gpu-bundle:
	mkdir -p $(GPU_BUNDLE)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_BUNDLE) -r benchmarks/gpu_bundle.txt
	du -sh $(GPU_BUNDLE)
