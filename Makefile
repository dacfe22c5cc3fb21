PYTHON ?= python
.PHONY: help install test test-fast demo lint format bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install mcl with the test and lint tools (editable)
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the whole suite, as CI runs it
	$(PYTHON) -m pytest -q

test-fast:  ## the suite without the tests marked slow
	$(PYTHON) -m pytest -q -m "not slow"

demo:  ## pre-train on the embedded digits on CPU; prints kNN top-1 before and after
	$(PYTHON) -m mcl.train experiment=demo

lint:  ## ruff check and format check
	$(PYTHON) -m ruff check mcl tests benchmarks
	$(PYTHON) -m ruff format --check mcl tests benchmarks

format:  ## ruff fix and format
	$(PYTHON) -m ruff check --fix mcl tests benchmarks
	$(PYTHON) -m ruff format mcl tests benchmarks
