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

# The paper's runs (sections 4.1, 4.2 and 4.3; README "Reproducing the paper" lists what each needs and
# roughly how long it takes on one GPU): the models' weights and the datasets (a Hugging Face cache or
# internet), LAION-400M pairs in webdataset shards, OfficeHome, and CC12M pairs for the proxy study.
LAION ?= /data/laion400m
OFFICEHOME ?= /data/OfficeHomeDataset_10072016
CC12M_ARGS ?=
UQVLM := $(VENV)/bin/uqvlm
reproduce: install
	$(UQVLM) run experiment=paper_zeroshot hessian_data@task.pairs=laion400m task.pairs.root=$(LAION)
	$(UQVLM) run -m experiment=paper_active_learning task/data=officehome task.data.root=$(OFFICEHOME) \
		hessian_data.root=$(LAION)
	$(UQVLM) run -m experiment=paper_active_learning task/data=imagenet-r-sketch hessian_data.root=$(LAION)
	$(UQVLM) run experiment=overhead
	$(UQVLM) run experiment=corruption hessian_data.root=$(LAION)
	$(UQVLM) run experiment=probcosine hessian_data.root=$(LAION)
	$(UQVLM) run experiment=hessian_size hessian_data.root=$(LAION)
	$(UQVLM) run experiment=proxy_data hessian_data.root=$(LAION) $(CC12M_ARGS)
	$(UQVLM) run experiment=prior_grid hessian_data.root=$(LAION)
	$(UQVLM) run experiment=uncertainty_error hessian_data.root=$(LAION)
	$(UQVLM) report

# The same protocol on the offline shapes world (the tiny CLIP), every study's offline twin, and the
# report: refreshes the committed results/ (README: how long it takes).
# skip_existing=false: every run is redone (a plain multirun skips configs it has finished).
OFFLINE := HF_HUB_OFFLINE=1 $(UQVLM)
REFRESH := skip_existing=false
reproduce-offline: install
	$(OFFLINE) run experiment=offline_zeroshot $(REFRESH)
	$(OFFLINE) run experiment=offline_active_learning $(REFRESH)
	$(OFFLINE) run experiment=offline_overhead $(REFRESH)
	$(OFFLINE) run experiment=offline_corruption $(REFRESH)
	$(OFFLINE) run experiment=offline_probcosine $(REFRESH)
	$(OFFLINE) run experiment=offline_hessian_size $(REFRESH)
	$(OFFLINE) run experiment=offline_proxy_data $(REFRESH)
	$(OFFLINE) run experiment=offline_prior_grid $(REFRESH)
	$(OFFLINE) run experiment=offline_uncertainty_error $(REFRESH)
	$(UQVLM) report

tables: install
	$(VENV)/bin/uqvlm report

clean-cache:
	rm -rf "$${UQVLM_CACHE:-$$HOME/.cache/uqvlm}"
