# GridCLIP for Detectron2: the two commands a newcomer needs are `make demo` and `make test`.
# Both create (or reuse) the project virtual environment first. Use an existing environment
# (e.g. one with your own detectron2 build) with `make test VENV=/path/to/env`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONWARNINGS ?= ignore::FutureWarning
export MPLBACKEND ?= Agg

.PHONY: env demo demo-quick test test-slow test-all lint format benchmark clean app

env:
	@VENV=$(VENV) bash tools/setup_env.sh

## The main job on the embedded default (generate world, train + evaluate GridCLIP and ViLD).
# Extra options, e.g. `make demo DEMO_ARGS="--threads 1 --force"`.
DEMO_ARGS ?=
demo: env
	$(PY) tools/run_embedded_demo.py --output-dir output/demo $(DEMO_ARGS)

## Fast test suite (what CI runs). Slow end-to-end tests: `make test-slow`.
test: env
	$(PY) -m pytest -q -m "not slow" --timeout=900 tests

test-slow: env
	$(PY) -m pytest -q -m slow --timeout=3600 tests

test-all: env
	$(PY) -m pytest -q --timeout=3600 tests

lint: env
	$(PY) -m pip install -q black isort flake8
	$(PY) -m black --check projects tools tests
	$(PY) -m isort --check-only projects tools tests
	$(PY) -m flake8 projects tools tests

format: env
	$(PY) -m pip install -q black isort
	$(PY) -m black projects tools tests
	$(PY) -m isort projects tools tests

benchmark: env
	$(PY) tools/benchmark.py --output-dir output/benchmark

## The interactive demo page (optional extra: installs Gradio + Selenium into the venv), on the
# model `make demo` trains; http://127.0.0.1:7860. Options: `make app APP_ARGS="--port 8000"`.
APP_ARGS ?=
app: env
	@VENV=$(VENV) bash tools/setup_env.sh --app
	$(PY) tools/app.py $(APP_ARGS)

clean:
	rm -rf output .pytest_cache
