# Set-up and the two everyday commands. Everything installs into .venv beside this file.
#   make quickstart   set up, then train the quickstart MoE language model on this machine
#   make test         set up, then run the default (CPU) test suite
#   make lint         ruff: format check and lint (as CI runs it)
PYTHON ?= python3
VENV ?= .venv
# The CPU machines this project is developed on have a local torch 2.13.0 wheel; any torch >= 2.4
# works: override with e.g. `make test TORCH_SPEC='torch==2.5.1'`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-all lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	# torch first and pinned, so that nothing below resolves a different (CUDA) build.
	$(BIN)/pip install "$(TORCH_SPEC)" numpy
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	# DeepSpeed ships only an sdist whose build imports torch: build it against the torch above.
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation -c $(VENV)/constraints.txt "deepspeed>=0.14"
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/moe train configs/quickstart.yaml

# pytest's own script, not `python -m pytest`: that would put the checkout's root on sys.path,
# where the folders behind the dynamoe namespace (kernels/, moe/, ...) shadow real packages.
test: setup
	$(BIN)/pytest -m "not slow and not gpu"

test-all: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: setup
	$(BIN)/moe bench layer

# On a fresh single-GPU machine (its own python3 with a CUDA torch and triton; no setup, no network):
# the gpu-marked tests and the kernel benchmark, one JSON (runs/gpu_check.json) and a summary, < 8 min.
# `make gpu-check GPU_CHECK_ARGS=--dry-run` checks the plan on a machine without a GPU.
gpu-check:
	$(PYTHON) evals/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
