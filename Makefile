# Set up a virtual environment, run the demo and run the tests.
#
#   make demo    pretrain, fine-tune and run a tiny model on two public chest CTs (CPU, < 20 min)
#   make test    the whole test suite (reads real CT from ../shared/data/ct when present)
#
# The environment gets the CPU build of torch unless torch is already installed in it.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The PyTorch CPU index first; where only PyPI is reachable, the pinned release from PyPI
	# (on Linux x86-64 that is a CUDA build unless a local CPU wheel is configured).
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install --retries 1 --timeout 20 --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION) || \
		$(BIN)/python -m pip install torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/dagman demo --output demo-output

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-output .pytest_cache
