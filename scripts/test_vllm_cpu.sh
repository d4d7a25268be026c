#!/usr/bin/env bash
# The real-engine test tier: builds .venv-vllm-cpu when needed (scripts/vllm_cpu_env.sh), then runs
# `pytest -m vllm_cpu` on tests/test_vllm_cpu.py in it (the other test files need the main
# environment's packages, hypothesis among them). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/vllm_cpu_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# A small KV cache: the tiny test model needs little, and the machine's memory is shared.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv-vllm-cpu/bin/python -m pytest -m vllm_cpu -rs tests/test_vllm_cpu.py "$@"
