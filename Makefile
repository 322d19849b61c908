# trajrep: `make install` then `make test`. Everything runs from the virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# apt needs root; use sudo when we are not root and it exists.
APT := $(if $(filter 0,$(shell id -u)),apt-get,$(shell command -v sudo >/dev/null && echo sudo apt-get))

.PHONY: install data test quickstart bench bench-gpu reproduce-table analysis

install: data
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,diffusers]"

# Fashion-MNIST for the real-data preset and tests, from Debian's package when apt is available.
data:
	@if [ -d $(FASHION_MNIST) ]; then echo "Fashion-MNIST found in $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null && [ -n "$(APT)" ]; then \
		$(APT) install -y dataset-fashion-mnist || ($(APT) update && $(APT) install -y dataset-fashion-mnist); \
	else echo "apt-get not available: Fashion-MNIST tests will be skipped (see README, 'Data')"; fi

test:
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

quickstart:
	$(BIN)/trajrep fit --config configs/quickstart.yaml

# Every speed benchmark, each printing ratios against a baseline measured in the same run (benchmarks/RESULTS.md).
bench:
	$(BIN)/python benchmarks/pretrain.py
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/probe_grid.py --epochs 1 --train 2304
	$(BIN)/python benchmarks/cache_dtype.py

# The prepared GPU check (benchmarks/gpu.py): on one GPU, under 8 minutes; writes its section of RESULTS.md.
bench-gpu:
	$(BIN)/python benchmarks/gpu.py

# The whole pipeline for a preset (configs/presets/$(PRESET).yaml), skipping finished stages; see README.
PRESET ?= smoke
reproduce-table:
	$(BIN)/trajrep reproduce configs/presets/$(PRESET).yaml

ANALYSIS_ARGS ?=  # e.g. "--mine-steps 0 --wandb-project P" (see README, Analyses)
analysis:  # after reproduce-table: per-task accuracy and attention over t -> results/$(PRESET)/analysis/
	$(BIN)/trajrep analyse results/$(PRESET)/probes $(ANALYSIS_ARGS)
