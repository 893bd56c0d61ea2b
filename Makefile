# Two commands for a fresh machine:
#   make train   set up .venv (CPU PyTorch + this project) and train a small LitGPT model on CPU:
#                lightning-thunder pretrain --config examples/recipes/debug.yaml (outputs in out/debug)
#   make test    set up .venv and run the test suite (what CI runs)
# Both reuse .venv when it is up to date. Override the interpreter or torch with PYTHON=... TORCH=...
# Recipe overrides go in ARGS: make train ARGS="train.max_steps=50 out_dir=out/short"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(subst =,-,$(subst >,,$(TORCH)))

.PHONY: install train test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install torch first and alone: the CPU build, not a multi-GB CUDA one pulled in as a dependency.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,litgpt]"
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lightning-thunder pretrain --config examples/recipes/debug.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
