# `make demo` and `make test` work on a fresh machine: they create .venv on
# first use and reuse it after. torch is installed on its own, first, so
# that pip takes the pinned CPU build instead of resolving a CUDA one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint format protos bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -x -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Every benchmark, each a side-by-side comparison that writes bench/results/NAME.json.
bench: $(STAMP)
	$(PY) -m bench.placement
	$(PY) -m bench.soak
	$(PY) -m bench.scale
	$(PY) -m bench.overhead
	$(PY) -m bench.batching
	$(PY) -m bench.store_ops
	$(PY) -m bench.security
	$(PY) -m bench.kinds

protos: $(STAMP)
	$(PY) -m protos.codegen

clean:
	rm -rf $(VENV) outputs .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
