# Two commands for a fresh machine:
#   make train   set up .venv (PyTorch + this project) and train a small LitGPT model on CPU:
#                lightning-thunder pretrain --config examples/recipes/debug.yaml (outputs in out/debug)
#   make test    set up .venv and run the test suite (what CI runs)
# Both reuse .venv when it is up to date. Recipe overrides go in ARGS: make train ARGS="train.max_steps=50 out_dir=out/short"
#
# Which PyTorch build: torch is installed first and alone, as `pip install $(TORCH_PIP_ARGS) $(TORCH)`.
#   - Where pip is configured with a local CPU wheel (the CI machine: /opt/wheels holds torch-2.13.0+cpu), the
#     default `torch==2.13.0` installs that CPU build.
#   - On plain PyPI, `torch==2.13.0` for Linux x86_64 is the CUDA build (several GB of nvidia-* packages). For the
#     CPU build there, add PyTorch's CPU index:
#       make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
#   - On a GPU machine keep the CUDA build, or choose one: make test TORCH="torch==2.11.0"
# The build that was installed is printed once ("torch 2.13.0+cpu: CPU build"). PIP_ARGS go to the project's own
# install (e.g. PIP_ARGS="--no-index --find-links wheels/"); PYTHON picks the interpreter of the venv.

PYTHON         ?= python3
VENV           ?= .venv
TORCH          ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP_ARGS       ?=
PY             := $(VENV)/bin/python
STAMP          := $(VENV)/.installed-$(subst =,-,$(subst >,,$(TORCH)))

.PHONY: install train test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_ARGS) -e ".[test,litgpt]"
	$(PY) -c "import torch; print('torch', torch.__version__ + ':', 'CUDA ' + torch.version.cuda + ' build' if torch.version.cuda else 'CPU build')"
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lightning-thunder pretrain --config examples/recipes/debug.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
