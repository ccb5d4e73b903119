# seedlings: the pipeline. `make help` lists the targets; each is a thin call of the `seedlings` CLI.
# Variables shared by every target (override on the command line: make train FOLD=0 CONFIG=configs/gpu.yaml):
COMPETITION ?= plant-seedlings-classification# Kaggle's name of the competition (data, upload, leaderboard)
DEFAULT_DATA := data/$(COMPETITION)
DATA     ?= $(DEFAULT_DATA)# competition folder: train/<Species>/*, test/*, sample_submission.csv
CONFIG   ?= configs/cpu.yaml# recipe (YAML)
RECIPE   ?= configs/gpu.yaml# kaggle: the recipe its notebook runs (any recipe, a run's config.yaml, a sweep's best.yaml)
RUN      ?= $(basename $(notdir $(CONFIG)))# run name: runs/$(RUN)/, submissions/$(RUN).csv
N_FOLDS  ?= 5# folds for cross-validation
FOLD_SEED ?= 0# seed of the fold split (separate from the recipe's training seed)
FOLD     ?=# one fold only (train, predict, lr-find)
STAGE    ?=# lr-find: the stage to sweep (default: the first SGDR stage), from the weights it starts with
RUNS     ?=# several runs to blend (submit): RUNS="a b"
ARGS     ?=# extra key=value recipe overrides: ARGS="batch_size=64 stages.1.size=160"
ABLATIONS ?=# compare: 1 adds fold 0 once per switch of configs/<recipe>-ablations.yaml (or ABLATIONS=<file>)
BASELINE ?=# compare: another recipe whose fold 0 and chain join the table (BASELINE=configs/cpu-v1.yaml)
BASE     ?= $(CONFIG)# try: the base recipe every variant is compared with
SEEDS    ?= 0 1# try: the fold seeds (each a split of its own) a verdict is taken over
LEVERS   ?=# try: a file of levers (label -> keys) tried one by one against BASE
GPUS     ?=# GPU ids for parallel folds: make -j 4 train GPUS="0 1 2 3" pins fold k to GPU k mod 4
SPACE    ?= configs/sweep-cpu.yaml# sweep: the search space (recipe key -> choices or a range)
TRIALS   ?= 20# sweep: trials in the study in all, however many workers share it
ADD_TRIALS ?=# sweep: 1 lets a TRIALS above the study's raise its total (another number is refused)
SWEEP    ?= $(basename $(notdir $(SPACE)))# sweep: study name, runs/$(SWEEP)/
STORAGE  ?=# sweep: postgresql://user:pass@host/db across machines (default: a journal file in runs/$(SWEEP)/)
PRUNER   ?= sha# sweep: sha (successive halving) | hyperband | none
SWEEP_FOLDS ?= 1# sweep: a trial's value comes from this many folds
OBJECTIVE ?= fold# sweep: fold (mean last-epoch val micro-F1) | chain (OOF micro-F1 of the folds' blend, as submitted)
HOLDOUT  ?=# sweep: 1 searches on make compare's held-out split of DATA (the report then grades the best once)
BLEND_ONLY ?=# submit: 1 trains no fold, blends those trained (by a cluster's fold array) and names the rest
HEARTBEAT ?=# sweep on a database: seconds between a trial's heartbeats (default 60)
GRACE    ?=# ...and seconds without one before its trial is retried (default 180)
GRADE    ?=# sweep: the report's held-out grade: 1 on the answers beside DATA, 0 never (default: with HOLDOUT=1)
PORT     ?=# dashboard, mlflow-ui: the port on 127.0.0.1 (default: a free one, printed)

PY        := .venv/bin/python
SEEDLINGS := .venv/bin/seedlings
STAMP     := .venv/.installed
COMMON     = --data "$(DATA)" --config "$(CONFIG)" --run "$(RUN)" --n-folds $(N_FOLDS) --fold-seed $(FOLD_SEED)
FOLDS     := $(if $(FOLD),$(FOLD),$(shell seq 0 $$(($(N_FOLDS) - 1))))
SWEEP_ARGS = $(COMMON) --space "$(SPACE)" --trials $(TRIALS) --sweep "$(SWEEP)" --pruner $(PRUNER) \
	--sweep-folds $(SWEEP_FOLDS) --objective $(OBJECTIVE) $(if $(STORAGE),--storage "$(STORAGE)") $(if $(HOLDOUT),--holdout) \
	$(if $(filter 0,$(GRADE)),--no-grade)$(if $(filter 1,$(GRADE)),--grade) $(if $(ADD_TRIALS),--add-trials) \
	$(if $(HEARTBEAT),--heartbeat $(HEARTBEAT)) $(if $(GRACE),--grace $(GRACE))
# the -j count make runs with (inside a recipe): parallel folds and sweep workers share the CPU threads by it
JOBS_SH    = jobs=$$(echo " $$MAKEFLAGS" | grep -o -- ' -j[0-9]*' | tr -dc 0-9); jobs=$${jobs:-1}

export NO_ALBUMENTATIONS_UPDATE := 1

.DEFAULT_GOAL := help
.PHONY: help setup data demo-data full-size-data check-data folds lr-find train predict submit try compare mle evaluate upload leaderboard demo \
	kaggle kaggle-push kaggle-output \
	test test-all \
	bench gpu-wheels gpu-check lint clean sweep sweep-study sweep-report dashboard mlflow-ui

help: ## list the targets
	@awk -F':.*## ' '/^[a-z-]+:.*## /{printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## build .venv and install the pinned requirements (idempotent)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

data: $(STAMP) ## download the competition with the kaggle CLI into DATA (skipped when verified)
	$(SEEDLINGS) fetch --data "$(DATA)" --competition "$(COMPETITION)"

demo-data: $(STAMP) ## generate a small synthetic competition in data/demo
	$(SEEDLINGS) demo-data --out data/demo --per-class 10 --seed 0

full-size-data: $(STAMP) ## a stand-in at Kaggle's counts and photo sizes in data/full-size (SOURCE: photos to upsample)
	$(SEEDLINGS) demo-data --full-size --out data/full-size --seed 0 $(if $(SOURCE),--source "$(SOURCE)")

check-data: $(STAMP) ## check layout, decode every image, report counts, sizes, duplicates
	$(SEEDLINGS) check-data --data "$(DATA)" --config "$(CONFIG)"

folds: $(STAMP) ## write the stratified, duplicate-grouped folds file for DATA, N_FOLDS, FOLD_SEED
	$(SEEDLINGS) folds --data "$(DATA)" --n-folds $(N_FOLDS) --fold-seed $(FOLD_SEED)

lr-find: $(STAMP) ## LR range test at stage STAGE from the weights it starts with: runs/RUN/lr_find-stageK.{png,csv}
	$(SEEDLINGS) lr-find $(COMMON) $(if $(FOLD),--fold $(FOLD)) $(if $(STAGE),--stage $(STAGE)) $(ARGS)

train: $(addprefix train-fold-,$(FOLDS)) ## train every fold in turn (FOLD=k: one; make -j N train: N at once)

# SEEDLINGS_JOBS: the -j count make runs with, so each fold takes its share of the CPU threads and loader workers
train-fold-%: $(STAMP) folds
	$(JOBS_SH); $(if $(GPUS),CUDA_VISIBLE_DEVICES=$(word $(shell echo $$(( $* % $(words $(GPUS)) + 1 ))),$(GPUS))) \
	SEEDLINGS_JOBS=$$jobs $(SEEDLINGS) train $(COMMON) --fold $* $(ARGS) || [ $$? -eq 3 ]  # 3: held elsewhere

predict: $(STAMP) ## TTA probabilities per fold and snapshot: runs/RUN/probs/<member>.{oof,test}.csv
	$(SEEDLINGS) predict $(COMMON) $(if $(FOLD),--fold $(FOLD)) $(ARGS)

submit: $(STAMP) $(if $(filter $(DEFAULT_DATA),$(DATA)),data) ## folds, train, predict, blend: submissions/RUN.csv
	$(SEEDLINGS) submit $(COMMON) $(if $(RUNS),--runs $(RUNS)) $(if $(BLEND_ONLY),--blend-only) $(ARGS)

compare: $(STAMP) ## accuracy benchmark on a held-out split of DATA: probes, one fold, the whole chain (ABLATIONS=1)
	$(SEEDLINGS) compare $(COMMON) $(if $(ABLATIONS),--ablations $(if $(filter-out 1,$(ABLATIONS)),--ablations-file "$(ABLATIONS)")) $(if $(BASELINE),--baseline "$(BASELINE)") $(ARGS)

# make -j N try: N workers share the study's folds through their locks (and machines sharing runs/ add more)
try: $(STAMP) ## is a change better? BASE and ARGS (or each of LEVERS) over SEEDS, compared image by image: a verdict
	@$(JOBS_SH); pids=; for i in $$(seq 1 $$jobs); do \
	  gpu=$$(echo "$(GPUS)" | awk -v i=$$i 'NF {print $$((i - 1) % NF + 1)}'); \
	  env $${gpu:+CUDA_VISIBLE_DEVICES=$$gpu} SEEDLINGS_JOBS=$$jobs $(SEEDLINGS) try --data "$(DATA)" --config "$(BASE)" \
	    --n-folds $(N_FOLDS) --seeds "$(SEEDS)" $(if $(LEVERS),--levers "$(LEVERS)") $(ARGS) & \
	  pids="$$pids $$!"; \
	done; rc=0; for p in $$pids; do wait $$p || rc=$$?; done; exit $$rc

mle: $(STAMP) ## MLE-bench's split of DATA (14% held out, not stratified): the whole chain, graded, beside Kaggle's lines
	$(SEEDLINGS) mle $(COMMON) $(ARGS)

sweep-study: $(STAMP) ## create the sweep's Optuna study once, before any worker (make sweep does this first)
	$(SEEDLINGS) sweep --create-only $(SWEEP_ARGS) $(ARGS)

# make -j N sweep: N workers here (GPU k mod len(GPUS) for worker k, CPU threads shared); the same command on other
# machines with the same STORAGE and a shared runs/ adds workers there
sweep: sweep-study ## search recipes with Optuna: SPACE, TRIALS, STORAGE, PRUNER (make -j N sweep: N workers)
	@$(JOBS_SH); pids=; for i in $$(seq 1 $$jobs); do \
	  gpu=$$(echo "$(GPUS)" | awk -v i=$$i 'NF {print $$((i - 1) % NF + 1)}'); \
	  env $${gpu:+CUDA_VISIBLE_DEVICES=$$gpu} SEEDLINGS_JOBS=$$jobs $(SEEDLINGS) sweep $(SWEEP_ARGS) $(ARGS) & \
	  pids="$$pids $$!"; \
	done; rc=0; for p in $$pids; do wait $$p || rc=$$?; done; exit $$rc

sweep-report: $(STAMP) ## a sweep's trials.csv, best.yaml, plots and report.md in runs/SWEEP/ (graded on a held-out split)
	$(SEEDLINGS) sweep-report --sweep "$(SWEEP)" $(if $(STORAGE),--storage "$(STORAGE)") \
	  $(if $(filter 0,$(GRADE)),--no-grade)$(if $(filter 1,$(GRADE)),--grade)

dashboard: $(STAMP) ## optuna-dashboard on the sweep's study, on 127.0.0.1 (the port is printed)
	$(SEEDLINGS) dashboard --sweep "$(SWEEP)" $(if $(STORAGE),--storage "$(STORAGE)") $(if $(PORT),--port $(PORT))

mlflow-ui: $(STAMP) ## MLflow's UI on runs/mlflow.db (tracking: mlflow), on 127.0.0.1 (the address is printed)
	$(SEEDLINGS) mlflow-ui $(if $(PORT),--port $(PORT))

evaluate: $(STAMP) ## out-of-fold micro-F1 of a predicted run: each fold with and without TTA, folds, snapshot blend
	$(SEEDLINGS) evaluate $(COMMON) $(ARGS)

upload: $(STAMP) ## send submissions/RUN.csv to Kaggle with a message from its provenance
	$(SEEDLINGS) upload --run "$(RUN)" --competition "$(COMPETITION)"

leaderboard: $(STAMP) ## list your Kaggle submissions and their public and private scores
	$(SEEDLINGS) leaderboard --competition "$(COMPETITION)"

# Kaggle's notebooks: RECIPE (default configs/gpu.yaml) run there offline; RUN, N_FOLDS, FOLD_SEED and ARGS as usual
KAGGLE_RUN = $(if $(filter command line environment,$(origin RUN)),--run "$(RUN)")
kaggle: $(STAMP) ## build kaggle/: a notebook and its wheel dataset that run RECIPE on Kaggle's GPUs offline
	$(SEEDLINGS) kaggle-bundle --config "$(RECIPE)" $(KAGGLE_RUN) --n-folds $(N_FOLDS) --fold-seed $(FOLD_SEED) $(ARGS)

kaggle-push: $(STAMP) ## send kaggle/ to Kaggle (a hub model's weights once, the wheels created or versioned, the notebook)
	$(SEEDLINGS) kaggle-push

kaggle-output: $(STAMP) ## fetch the finished notebook's runs/RUN and submission into runs/ and submissions/
	$(SEEDLINGS) kaggle-output --config "$(RECIPE)" $(KAGGLE_RUN)

demo: $(STAMP) ## the whole chain on a generated competition: submissions/demo.csv
	$(SEEDLINGS) demo-data --out data/demo --per-class 10 --seed 0
	$(SEEDLINGS) submit --data data/demo --config configs/cpu.yaml --run demo --n-folds 5 --fold-seed 0 \
	  mixup_alpha=0 cutmix_alpha=0 precision=fp32 $(ARGS)
# the demo: 172 images a fold, so 6 steps an epoch, too few for mixing to pay; float32 on every CPU, so its numbers
# do not depend on whether the CPU computes bf16, and its exported model gives its probabilities

test: $(STAMP) ## the fast tests (CPU, a few minutes)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) ## every test, slow end-to-end runs included
	$(PY) -m pytest -q

GPU_WHEELS := albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing_extensions==4.16.0 stringzilla==5.3.2 simsimd==6.5.16 tqdm==4.70.1

gpu-wheels: $(STAMP) ## download into .whl/ the wheels the GPU machine lacks (Python 3.12, x86-64) for gpu-check
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d .whl $(GPU_WHEELS)

gpu-check: ## on a GPU machine: throughput of the GPU data path, peak memory, one fold (JSON in runs/gpu-check)
	bash scripts/gpu-check.sh

bench: $(STAMP) ## loader, training and prediction throughput side by side (ratios); DATA's real images too when it exists
	$(SEEDLINGS) bench $(if $(wildcard $(DATA)/train),--data "$(DATA)")

lint: $(STAMP) ## ruff check and format check
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

clean: ## remove runs, caches, folds and submissions (keeps downloaded data and .venv)
	rm -rf runs data/cache data/folds data/demo submissions/*.csv submissions/*.json
