# fewlabels: `make setup`, then `make test`. Main commands: `make pretrain`, `make probe N=100`.
PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
FEWLABELS := $(VENV)/bin/fewlabels
TORCH     ?= torch==2.14.1 torchvision==0.29.1
DATASET_DIR := /usr/share/datasets/fashion-mnist
LEDGER      := checkpoints/ledger.json

METHOD   ?= simclr
PRESET   ?=
N        ?= 100
STRATEGY ?= random
ALGO     ?= fixmatch
PROBE    ?= all
SEEDS    ?= 3
TARGET   ?= 0.90
BUDGETS  ?= 20,40,100,250,500,1000
COLD     ?= typiclust
SELECT   ?= margin
CKPT     ?=
ARGS     ?=
RUNS     ?=
VIEWS    ?= flip
# A new .venv with torch 2.14.1 / torchvision 0.29.1 (a CUDA build on x86_64) and the package's
# dependencies: 6,088 MB (`du -sm .venv`, session 66). `make setup` stops first when less is free.
SETUP_MIN_FREE_GB ?= 7
comma    := ,
space    := $(subst ,, )
CKPT_ARG  = $(if $(CKPT),checkpoint=$(CKPT))
# curve / search with a fine-tuned learner (LEARNER=supervised|fixmatch|...) instead of probes
LEARNER  ?=
LEARNER_ARG = $(if $(LEARNER),learner=$(LEARNER))

.PHONY: setup check-space data postgres keep test lint pretrain finetune active report evaluate probe curve search stats bench-pretrain \
	bench-precision bench-finetune bench-capacity bench-probcover gpu-pack gpu-unpack

setup: $(VENV)/.installed data postgres

$(VENV)/.installed: pyproject.toml | check-space
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Before the first install into $(VENV) (no torch there yet): a clear stop instead of pip's
# "No space left on device" halfway through. SETUP_MIN_FREE_GB=0 skips it.
check-space:
	@case "$(SETUP_MIN_FREE_GB)" in ""|*[!0-9]*) \
		echo "check-space: SETUP_MIN_FREE_GB=$(SETUP_MIN_FREE_GB): give a whole number of GB (0 skips the check)"; \
		exit 2;; esac; \
	if ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1; then exit 0; fi; \
	dir="$(abspath $(VENV))"; while [ ! -d "$$dir" ]; do dir="$$(dirname "$$dir")"; done; \
	free_gb="$$(df -Pk "$$dir" | awk 'NR == 2 {print int($$4 / 1048576)}')"; \
	if [ "$$free_gb" -lt "$(SETUP_MIN_FREE_GB)" ]; then \
		echo "make setup: $$free_gb GB free on the disk of $$dir; torch, torchvision and the package take about 6 GB in $(VENV), so setup needs $(SETUP_MIN_FREE_GB) GB free. Free space there (old clones and their .venv, \`pip cache purge\`) and rerun make setup, or give SETUP_MIN_FREE_GB=0 to skip this check."; \
		exit 2; fi

# The Debian package when we can install it; otherwise the loader downloads the official files.
data: $(VENV)/.installed
	@if [ ! -d $(DATASET_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get could not install dataset-fashion-mnist; downloading instead"; fi
	$(FEWLABELS) data prepare
	@if [ -f $(LEDGER) ]; then $(FEWLABELS) oracle import $(LEDGER); fi

# Carry runs to a fresh clone on another machine, in git (README, "Carrying runs to another
# machine"): stages the files scripts/keep.py names and the ledger, which `make setup` imports,
# and untracks the files kept before that it names no longer (`git rm --cached`).
KEEP_STATE = $(if $(filter 1,$(UNFINISHED)),--training-state)
keep: $(VENV)/.installed
	@test -n "$(RUNS)" || { echo 'keep: give RUNS="checkpoints/<run> checkpoints/finetuned/active-<run>-seed<S> ..."'; exit 2; }
	@case "$(UNFINISHED)" in ""|0|1) ;; *) echo 'keep: UNFINISHED=$(UNFINISHED): give UNFINISHED=1 (also keep the training state of a round killed mid-training, or of a pretraining run with steps left) or leave it out'; exit 2;; esac
	files="$$($(PY) scripts/keep.py $(KEEP_STATE) $(RUNS))" \
		&& stale="$$($(PY) scripts/keep.py --stale $(KEEP_STATE) $(RUNS))" \
		&& $(FEWLABELS) oracle export --out $(LEDGER) && git add -f $(LEDGER) $$files \
		&& { [ -z "$$stale" ] || git rm -q --cached $$stale; } \
		&& echo "staged $(LEDGER) and $$(echo "$$files" | wc -l) files; untracked $$(echo "$$stale" | grep -c .) no longer kept"

# PostgreSQL's server binaries (initdb, pg_ctl): the label-database tests start a throwaway cluster.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
			>/dev/null) || { echo "apt-get could not install postgresql"; exit 1; }; \
	else echo "install PostgreSQL (Debian: apt-get install postgresql) for 'make test'"; exit 1; fi

lint:
	$(VENV)/bin/ruff check fewlabels tests benchmarks scripts

test: lint
	$(PY) -m pytest -q

pretrain:
	$(FEWLABELS) pretrain method=$(METHOD) $(if $(PRESET),preset=$(PRESET)) $(ARGS)

# STRATEGY defaults to typiclust here (the config's default) unless given on the command line.
finetune:
	$(FEWLABELS) finetune n=$(N) algorithm=$(ALGO) seeds=$(SEEDS) \
		$(if $(filter command line,$(origin STRATEGY)),strategy=$(STRATEGY)) \
		$(if $(PRESET),preset=$(PRESET)) $(CKPT_ARG) $(ARGS)

# Active rounds: COLD picks the first budget's ids, SELECT buys the rest where the model is unsure.
active:
	$(FEWLABELS) active budgets=[$(BUDGETS)] algorithm=$(ALGO) strategy=$(COLD) \
		select=$(SELECT) seeds=$(SEEDS) target=$(TARGET) \
		$(if $(PRESET),preset=$(PRESET)) $(CKPT_ARG) $(ARGS)

report:
	$(FEWLABELS) report

# Saved active runs' final models on the test set with test-time views (VIEWS=flip|none);
# ENSEMBLE=1: each seed's folders are the members of one classifier (mean softmax).
evaluate:
	@test -n "$(RUNS)" || { echo 'evaluate: give RUNS="checkpoints/finetuned/active-<run>-seed<S> ..."'; exit 2; }
	$(FEWLABELS) evaluate runs=[$(subst $(space),$(comma),$(strip $(RUNS)))] views=$(VIEWS) \
		$(if $(ENSEMBLE),ensemble=$(or $(if $(filter 1,$(ENSEMBLE)),true),$(if $(filter 0,$(ENSEMBLE)),false),$(ENSEMBLE))) $(ARGS)

probe:
	$(FEWLABELS) probe n=$(N) strategy=$(STRATEGY) probe=$(PROBE) seeds=$(SEEDS) $(CKPT_ARG) $(ARGS)

curve:
	$(FEWLABELS) curve probe=$(PROBE) seeds=$(SEEDS) $(LEARNER_ARG) $(CKPT_ARG) $(ARGS)

search:
	$(FEWLABELS) search search.target=$(TARGET) strategy=$(STRATEGY) seeds=$(SEEDS) \
		search.probe=$(if $(filter all,$(PROBE)),linear,$(PROBE)) $(LEARNER_ARG) $(CKPT_ARG) $(ARGS)

stats:
	$(FEWLABELS) oracle stats

bench-pretrain:
	$(PY) benchmarks/bench_pretrain.py $(ARGS)

bench-precision:
	$(PY) benchmarks/bench_precision.py $(ARGS)

bench-finetune:
	$(PY) benchmarks/bench_finetune.py $(ARGS)

bench-capacity:
	$(PY) benchmarks/bench_capacity.py $(ARGS)

bench-probcover:
	$(PY) benchmarks/bench_probcover.py $(ARGS)

# The GPU check runs on a lent device machine in one call (README, "GPU"): pack here, run there,
# unpack here. FILES: the folder the device call returned.
gpu-pack:
	$(PY) scripts/gpu/pack.py

gpu-unpack:
	@test -n "$(FILES)" || { echo "usage: make gpu-unpack FILES=<folder the device call returned>"; exit 2; }
	$(PY) scripts/gpu/unpack.py $(FILES)
