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
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/diffscore fit --config experiments/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check diffscore tests bench
	$(BIN)/ruff format --check diffscore tests bench

bench: install
	$(BIN)/python bench/model_size.py

clean:
	rm -rf runs lightning_logs .pytest_cache
