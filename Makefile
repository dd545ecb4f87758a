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

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-cache:
	rm -f cache/*.h5
