#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): medrl's pure core on a Qwen3-1.7B-shaped model with random bf16 weights,
# one table in well under 8 minutes on one GPU. Needs python3 with torch, transformers, peft (no Ray, no vLLM).
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --small    # CPU-sized shapes: checks the script anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the configs' numbers travel in bench/gpu_plan.json; refresh it wherever medrl's config loader imports (pydantic)
if "$PY" -c "import pydantic" 2>/dev/null; then "$PY" bench/gpu_check.py --write-plan >/dev/null; fi
exec timeout 480 "$PY" bench/gpu_check.py "$@"
