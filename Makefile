# The two commands in the README: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo test test-slow lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) examples/pipeline_demo.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy rlinf scheduler

test: lint
	$(PY) -m pytest tests -q

test-slow: setup
	$(PY) -m pytest tests -q -m slow

bench:
	@RLINF_EXTRAS=bench bash scripts/setup.sh
	$(PY) benchmarks/channel_throughput.py
