# fedrad: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedrad-installed

# Flower: no telemetry, no update check, no runtime dependency installation.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install nginx demo test lint bench bench-speed bench-accuracy clean

install: $(STAMP) nginx

# The coordinator's `fedrad server start` runs nginx as the hospitals' front door (fedrad/front_door.py):
# Debian's, installed here when this runs as root; otherwise a note (a hospital's node does not need it).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null) \
	      || echo "nginx could not be installed: 'fedrad server start' needs it (apt-get install nginx-light)"; \
	  else echo "note: nginx is not installed; the server's front door needs it: sudo apt-get install nginx-light"; fi; }

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
	$(VENV)/bin/fedrad simulate --rounds 5 --out runs/demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# `make bench`: the three issue-7 benchmarks (DP speed, federation overhead, accuracy table) and the I/O ones.
bench: bench-speed bench-accuracy
	$(PY) benchmarks/dicom_io.py --json benchmarks/results/dicom_io.json
	$(PY) benchmarks/augment_speed.py --json benchmarks/results/augment_speed.json
	$(PY) benchmarks/readme.py

# DP step vs non-private step vs Opacus (throughput ratios, peak memory), then Flower vs one process.
bench-speed: install
	mkdir -p benchmarks/results
	$(PY) benchmarks/dp_speed.py --json benchmarks/results/dp_speed.json
	$(PY) benchmarks/federation.py --json benchmarks/results/federation.json

# The accuracy table (benchmarks/results/accuracy.md and .json): pooled, local, FedAvg/FedProx/FedAdam and DP rows
# on the shared chest X-rays in four DICOM hospitals; the three DP strategy rows run 3 times each (--repeats).
# Long on a CPU; ACCURACY_ARGS="--quick" is a smoke test, ACCURACY_ARGS="--rows pooled,fedavg" a subset,
# ACCURACY_ARGS="--repeats 1" one run per row.
# Then the unseen-hospital table (benchmarks/results/accuracy-unseen.md and .json): each row that matters trained four
# times, each time without one hospital, and tested on all of that hospital's images (UNSEEN_ARGS adds options; a
# smoke test writes into the workdir instead: run the script with --quick --unseen only yourself).
bench-accuracy: install
	$(PY) benchmarks/accuracy.py $(ACCURACY_ARGS)
	$(PY) benchmarks/accuracy.py --unseen only --rows unseen --repeats 1 \
	    --json benchmarks/results/accuracy-unseen.json --markdown benchmarks/results/accuracy-unseen.md $(UNSEEN_ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
