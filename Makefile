# Two commands on a fresh machine: `make run` (the flowers demo, end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test clean-cache

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# params.json holds the values a user's photos deserve; the demo shortens the head and leaves out
# finetuning (minutes per epoch on a laptop CPU), for its own speed only.
DEMO_OVERRIDES ?= --set head.batch_size=32 --set head.lr=0.01 --set 'run.stages=["extract", "head", "logistic"]'

run: $(VENV)/.installed
	@echo "make run: the flowers demo with params.json, shortened for speed by: $(DEMO_OVERRIDES)"
	$(PY) run_pipeline.py $(DEMO_OVERRIDES)
	@echo "finetuning, left out above: $(PY) run_pipeline.py finetune --set finetune.epochs=1 --set finetune.init_head=cached (one epoch from the head; params.json: 25 epochs)"

# One pytest worker per core, at most 4 (pytest-xdist), each test file on one worker in its order:
# the suite is mostly single-threaded start-ups and small tensors, so on 2 cores it takes 0.6x the time
# of one worker (docs/benchmarks.md). `$(PY) -m pytest -q` still runs it in one process.
TEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

test: $(VENV)/.installed
	$(PY) -m pytest -q $(TEST_WORKERS)

clean-cache:
	rm -f cache/*.h5
