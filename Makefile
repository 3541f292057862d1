# The two commands: `make demo` and `make test`. Both create and reuse .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Tests force 8 host devices so multi-device code runs on a CPU-only machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# Two xdist workers (CI has 2 cores), one module per worker at a time, longest first (tests/conftest.py).
PYTEST_ARGS ?=

.PHONY: demo test lint setup setup-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps record which extras are installed; they are redone when setup.py changes.
$(VENV)/.setup-core: setup.py | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.setup-test: setup.py | $(PY)
	$(PIP) install -q -e ".[test]"
	bash tools/install_system_deps.sh
	touch $@ $(VENV)/.setup-core

setup: $(VENV)/.setup-core
setup-test: $(VENV)/.setup-test

# make demo's wall-clock budget in seconds, set-up included (issue 14: 20 minutes on 2 cores),
# counted from make's start: launch.demo gets what the set-up left (its --budget_s).
DEMO_BUDGET_S ?= 1200
MAKE_START := $(shell date +%s)

demo: $(VENV)/.setup-core
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m launch.demo \
		--budget_s=$$(( $(DEMO_BUDGET_S) - $$(date +%s) + $(MAKE_START) ))

lint: $(VENV)/.setup-test
	$(PY) -m ruff check .

test: $(VENV)/.setup-test
	$(PY) -m ruff check .
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(VENV)/.setup-test
	JAX_PLATFORMS=cpu $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info
