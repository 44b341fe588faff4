# fedrad: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedrad-installed

# Flower: no telemetry, no update check, no runtime dependency installation.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these machines carry these builds locally (a newer torch is a multi-GB download)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# runs/demo is the demo's scratch run directory: each `make demo` starts it afresh.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/fedrad simulate --out runs/demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/dp_step.py
	$(PY) benchmarks/federation.py
	$(PY) benchmarks/dicom_io.py
	$(PY) benchmarks/augment_speed.py
	$(PY) benchmarks/multiplicity.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
