# posttrain: `make run` and `make test` are all a fresh clone needs (both run `setup` first).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export UNSTRUCTURED_DISABLE_NOTICE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 2
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_LOGGING_TO_API_ENABLED := false

.PHONY: setup run test test-fast lint ui status bench clean

setup: $(STAMP)

# Order matters (see constraints.txt): CPU torch first from the local wheel folder, then the
# project with every pin, then unstructured-inference without its deps (timm -> CUDA torchvision).
$(STAMP): pyproject.toml constraints.txt tools/spacy-en-alias/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0+cpu
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' ./tools/spacy-en-alias
	$(BIN)/pip install -q -c constraints.txt --no-deps unstructured-inference
	$(BIN)/python -c "import spacy; spacy.load('en_core_web_sm')"
	touch $(STAMP)

run: setup
	$(BIN)/posttrain run

status: setup
	$(BIN)/posttrain status

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup
	$(BIN)/ruff check components tasks flows tests benchmarks
	$(BIN)/ruff format --check components tasks flows tests benchmarks

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf .prefect mlflow.db mlartifacts
