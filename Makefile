# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   generate the synthetic shapes data set, train, evaluate, draw predictions
#   make test   run the test suite (torchvision is the oracle, installed as the `test` extra)
VENV ?= .venv
PY := $(VENV)/bin/python
# --durations: CI's log names the slowest tests (the suite must stay well under 30 min).
# --dist loadfile: each test module runs on one worker, so its module fixtures (compiles,
# multi-process jobs) run once instead of once per worker.
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=25

.PHONY: demo test

$(VENV)/.installed-base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed-base
	$(PY) scripts/main_job.py --workdir workdirs/shapes
