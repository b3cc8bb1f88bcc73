# Two commands set up and run everything on a fresh machine:
#   make train   trains on the built-in synthetic dataset (accelerate launch scripts/train.py)
#   make test    runs the test suite
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel
# this project's CI uses; on a GPU machine use e.g. `make train TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install train test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[train,dev,export]"
	touch $@

train: install
	$(BIN)/accelerate launch scripts/train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests
