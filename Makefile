# Quick start: `make demo` runs the whole pipeline on the built-in data,
# `make test` runs the test suite. Both build .venv first when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

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

# the lint and the type check first: they take seconds and name the line; the tests on
# one worker process per core (at most 4), one torch thread each (tests/conftest.py)
test: $(STAMP)
	$(VENV)/bin/ruff check clip_ping tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n auto --maxprocesses 4

clean:
	rm -rf runs .pytest_cache
