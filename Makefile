# Quick start: `make demo` runs the whole pipeline on the built-in data,
# `make test` runs the test suite. Both build .venv first when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# The tested torch/torchvision pair is installed first (pyproject.toml only states
# ranges), so the editable install below finds it in place (see DEVELOPERS.md).
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[all,test,bench]"
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
