# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel first (pip takes it from local disk); the extras then find torch satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) -m svdtrain demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile  # two workers, a test file each
