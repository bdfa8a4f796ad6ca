# uqvlm: `make demo` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build this workplace installs from local disk; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
SHAPES_DOMAINS := shapes-photo,shapes-sketch,shapes-noisy,shapes-lowcontrast,shapes-blur

.PHONY: install demo test lint format reproduce reproduce-offline clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/uqvlm run

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check uqvlm tests scripts
	$(VENV)/bin/ruff format --check uqvlm tests scripts

format: install
	$(VENV)/bin/ruff format uqvlm tests scripts
	$(VENV)/bin/ruff check --fix uqvlm tests scripts

# The zero-shot protocol on the offline shapes world: the tiny model on every domain.
reproduce-offline: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/uqvlm run -m dataset=$(SHAPES_DOMAINS)

reproduce: reproduce-offline

clean-cache:
	rm -rf "$${UQVLM_CACHE:-$$HOME/.cache/uqvlm}"
