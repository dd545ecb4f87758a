# Two commands on a fresh machine: `make run` (the demo, end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test clean-cache

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(PY) run_pipeline.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-cache:
	rm -f cache/*.h5
