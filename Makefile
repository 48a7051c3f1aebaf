# Two commands matter: `make demo` (the whole pipeline on built-in data) and `make test` (the in-process tests;
# `make test-process` runs the second tier: tests that start Python processes, and end-to-end runs).
# Each sets up its own .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo test test-process bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	PYTHON=$(PY) bash example_usage.sh

test: $(STAMP)
	$(PY) -m pytest -q -m "not process and not slow"

test-process: $(STAMP)
	$(PY) -m pytest -q -m "process or slow"

bench: $(STAMP)
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.dynn_costs
	$(PY) -m benchmarks.early_exit --checkpoint checkpoint/checkpoint_DEMO_0.75_confEE/best.pth --data-set DEMO

clean:
	rm -rf runs splits checkpoint_warmup checkpoint_result data/DEMO data/DIGITS export bench .pytest_cache
	find checkpoint -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
