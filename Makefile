# The two commands a new user needs: `make demo` and `make test`.
# Both create the virtual environment and install what they need first.
# operator/ at the root would shadow the stdlib module for any Python that puts the
# working directory on sys.path (python -m, python -c): never let it.
export PYTHONSAFEPATH := 1
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aurora-installed
EXTRAS ?= runtime,operator,dev

.PHONY: demo test unit integration e2e chaos lint typecheck install model system clean help

help:
	@echo "make demo   - run the whole loop locally (aurora local) on the default model"
	@echo "make test   - lint, type-check and run every test (unit, integration, e2e)"
	@echo "make chaos  - minutes of load through hot swaps, Redis and trainer kills (RELIABILITY.md)"
	@echo "make unit | integration | e2e | lint | typecheck | model | clean"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade "pip>=23.2"
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# System packages the tests use: Lua 5.1 runs the Argo CD health check.
system:
	@command -v lua5.1 >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.1 >/dev/null; \
	  else echo "NOTE: lua5.1 is missing (apt-get install lua5.1); the Argo CD health check tests will skip"; fi; }

model: install
	$(BIN)/aurora models pull smollm2-135m

lint: install
	$(BIN)/ruff check aurora operator runtime tests scripts
	$(BIN)/ruff format --check aurora operator runtime tests scripts
	$(BIN)/hadolint Dockerfile

typecheck: install
	$(BIN)/python scripts/typecheck.py

unit: install
	$(BIN)/pytest -m unit

integration: model
	$(BIN)/pytest -m integration

e2e: install
	$(BIN)/pytest -m e2e

test: model system lint typecheck
	$(BIN)/pytest

demo: model
	$(BIN)/aurora local

# The long version of tests/reliability/test_chaos_load.py; prints a JSON report.
chaos: model
	mkdir -p out/chaos
	$(BIN)/python -m aurora.runtime.chaos --workdir out/chaos --report out/chaos/report.json

clean:
	rm -rf $(VENV) .typecheck .pytest_cache .mypy_cache .ruff_cache build *.egg-info
