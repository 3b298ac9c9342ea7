# diffscore — the commands a user and CI need. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch/torchvision pinned to the builds available on the project's machines (a CUDA build on x86_64).
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: install quickstart test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,sd]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/diffscore fit --config experiments/quickstart.yaml

# The suite's networks are tiny: one thread each runs them fastest, and on a busy machine two threads per process
# made them ~10x slower (set OMP_NUM_THREADS to override).
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check diffscore tests bench
	$(BIN)/ruff format --check diffscore tests bench

bench: install  # CPU benchmarks; GPU ones (bench/loader.py --train) run on a GPU machine
	$(BIN)/python bench/model_size.py
	$(BIN)/python bench/loader.py --images 1500 --workers 0 2

clean:
	rm -rf runs lightning_logs .pytest_cache
