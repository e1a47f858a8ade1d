# Quick start: `make demo` and `make test`. Each sets up everything on a fresh machine first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# PyTorch is installed only when missing. Without a CUDA GPU this pins the release whose CPU build the
# project is tested with; on other CPU-only machines add TORCH_INDEX=https://download.pytorch.org/whl/cpu
# to avoid the multi-GB CUDA wheels.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu test-slow lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e ".[dev]"
	touch $@

demo: install
	$(PY) collect.py
	$(PY) train.py router=mha layer='range(0,4)' -m
	$(PY) evaluate.py mode=sparse
	$(PY) generate.py mode=sparse decode.max_new_tokens=32

test: install
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
