# uqvlm: `make demo` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build this workplace installs from local disk; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format reproduce reproduce-offline tables clean-cache

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

# The paper's tables: needs the models' weights and the datasets (a Hugging Face cache or internet), the
# LAION-400M shards and a local OfficeHome copy:
#   make reproduce LAION=/data/laion400m OFFICEHOME=/data/OfficeHomeDataset_10072016
LAION ?=
OFFICEHOME ?=
PAIRS := $(if $(LAION),hessian_data.root=$(LAION))
reproduce: install
	$(VENV)/bin/uqvlm run experiment=paper_zeroshot $(PAIRS)
	$(VENV)/bin/uqvlm run -m experiment=paper_active_learning task/data=officehome \
		$(if $(OFFICEHOME),task.data.root=$(OFFICEHOME)) $(PAIRS)
	$(VENV)/bin/uqvlm run -m experiment=paper_active_learning task/data=imagenet-r-sketch $(PAIRS)
	$(VENV)/bin/uqvlm report

# The same protocols on the offline shapes world: the tiny model zero-shot on every domain, and active
# learning with target sketch (its fine-tuning settings: scripts/finetune_search.py, committed output).
reproduce-offline: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/uqvlm run experiment=offline_zeroshot
	HF_HUB_OFFLINE=1 $(VENV)/bin/uqvlm run experiment=offline_active_learning
	$(VENV)/bin/uqvlm report

tables: install
	$(VENV)/bin/uqvlm report

clean-cache:
	rm -rf "$${UQVLM_CACHE:-$$HOME/.cache/uqvlm}"
