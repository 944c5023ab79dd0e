# clims-pl: every target creates the virtual environment first, so a fresh clone needs nothing else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# data.root=DIR: the dataset folder, the same key and spelling as on every command (`clims-reproduce data.root=DIR`);
# unset, the commands use conf/reproduce.yaml's data.root (data/VOCdevkit/VOC2012 under the launch directory).
ARGS ?=
DATA_OVERRIDE = $(if $(data.root),data.root=$(data.root))
ifeq ($(origin VOC_ROOT),command line)
$(error VOC_ROOT is now data.root, as on every command: make $(MAKECMDGOALS) data.root=$(VOC_ROOT))
endif
ifeq ($(origin COCO_ROOT),command line)
$(error COCO_ROOT is now data.root, as on every command: make $(MAKECMDGOALS) data.root=$(COCO_ROOT))
endif

.DEFAULT_GOAL := help
.PHONY: help venv test lint format demo demo-seeds demo-figure bench bench-gpu preflight reproduce reproduce-coco ablation clean

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: data.root=DIR (the dataset folder) ARGS='extra hydra overrides'"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: these wheels are the ones that import together on the project's machines.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,coco]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install clims-pl with the dev and coco extras

test: $(STAMP) ## run the test suite (CPU, tiny configs)
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP) ## end-to-end pipeline on the embedded offline toy world
	$(BIN)/clims-demo $(DATA_OVERRIDE) $(ARGS)

demo-seeds: $(STAMP) ## make demo for seeds 0, 1, 2 + their mean/sd table runs/toy_demo_seeds/seeds.md (~3x demo)
	$(BIN)/clims-reproduce -m experiment=toy_demo_seeds $(DATA_OVERRIDE) $(ARGS)

demo-figure: $(STAMP) ## redraw docs/img/demo.png (README) from the finished demo in runs/toy_demo
	$(BIN)/python -m clims_pl.plots runs/toy_demo docs/img/demo.png

bench: $(STAMP) ## speed/memory benchmarks, JSON lines on stdout
	@for b in benchmarks/bench_*.py; do [ $$b = benchmarks/bench_gpu.py ] && continue; echo "# $$b" >&2; $(BIN)/python $$b || exit 1; done

bench-gpu: $(STAMP) ## the reference-size GPU benchmarks (CLIMS step, CAM inference, random walk), <= 5 min
	$(BIN)/python benchmarks/bench_gpu.py $(ARGS)

preflight: $(STAMP) ## paper_voc in miniature before the real run: time/memory/precision per stage (data.root=DIR)
	$(BIN)/clims-reproduce experiment=paper_voc preflight=true $(DATA_OVERRIDE) $(ARGS)

reproduce: $(STAMP) ## the paper table on PASCAL VOC 2012 (data.root=DIR)
	$(BIN)/clims-reproduce experiment=paper_voc $(DATA_OVERRIDE) $(ARGS)

reproduce-coco: $(STAMP) ## the reference's MS-COCO 2014 pipeline (data.root=DIR; masks from `clims-data coco-masks`)
	$(BIN)/clims-reproduce experiment=paper_coco $(DATA_OVERRIDE) $(ARGS)

ablation: $(STAMP) ## loss on/off and weight sweeps on VOC (data.root=DIR)
	$(BIN)/clims-reproduce -m experiment=ablation_losses $(DATA_OVERRIDE) $(ARGS)

clean: ## remove the venv and generated outputs
	rm -rf $(VENV) outputs multirun runs .pytest_cache .ruff_cache
