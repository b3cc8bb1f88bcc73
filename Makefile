# Two commands set up and run everything on a fresh machine:
#   make train   trains on the built-in synthetic dataset (accelerate launch scripts/train.py)
#   make test    runs the test suite
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default is the CPU wheel
# this project's CI uses; on a GPU machine use e.g. `make train TORCH_SPEC=torch`.
#
# `make test` also runs the tests that need torchvision (timm backbones, transformers' torchvision image
# processors) in a second environment, .venv-timm: the CPU torch wheel has no torchvision, so that one
# gets a torch / torchvision pair (a CUDA build that runs on the CPU) and timm.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
TIMM_VENV ?= .venv-timm
TIMM_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TIMM_BIN := $(TIMM_VENV)/bin
# what runs in the torchvision environment
TIMM_TESTS ?= tests/test_timm_backbone.py tests/test_evaluation.py \
	tests/test_variants.py::test_sigmoid_variants_save_the_top_k_processor tests/test_modeling.py::test_pipeline_on_a_real_photograph

.PHONY: install install-timm train test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[train,dev,export]"
	touch $@

install-timm: $(TIMM_VENV)/.installed

$(TIMM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_BIN)/python -m pip install -q --upgrade pip
	$(TIMM_BIN)/python -m pip install -q $(TIMM_TORCH_SPEC)
	$(TIMM_BIN)/python -m pip install -q -e ".[train,dev,timm]"
	touch $@

# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise (or given --cpu): the built-in run would use
# one core. TRAIN_THREADS: torch threads of the training process, default $$OMP_NUM_THREADS or every CPU.
TRAIN_THREADS ?= $(or $(OMP_NUM_THREADS),$(shell nproc 2>/dev/null || echo 1))

train: install
	$(BIN)/accelerate launch --num_cpu_threads_per_process $(TRAIN_THREADS) scripts/train.py $(ARGS)

# The suite runs in TEST_WORKERS pytest-xdist processes (one per CPU by default), each with one torch thread:
# on tiny models two single-threaded workers finish sooner than one two-threaded process.
TEST_WORKERS ?= auto
test: install install-timm
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) tests
	OMP_NUM_THREADS=1 $(TIMM_BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) $(TIMM_TESTS)
