# radfed: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.radfed-installed
DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo

export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO ?= 0

.PHONY: install demo test test-fast check lint types format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/radfed synth --task classification --sites 3 --cases-per-site 300 --seed 7 \
		--out $(DEMO_DATA) --overwrite
	$(BIN)/radfed simulate --data $(DEMO_DATA) --task classification --rounds 3 --seed 7 \
		--out $(DEMO_RUN) --overwrite

# Two workers: the end-to-end tests that mostly wait (a deployment) run beside the others;
# the Ray simulations stay one at a time (pytest-xdist groups, see tests/e2e/).
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not e2e"

# The benchmarks (bench/README.md), each writing JSON and Markdown under bench/results/;
# about 1.5 hours on 2 cores. A subset: make bench BENCH="aggregation_bench overhead_bench".
BENCH ?= data_bench train_bench dp_coverage bias_power aggregation_bench overhead_bench \
	quality_bench scale_bench deployed_bench
bench: install
	@set -e; for name in $(BENCH); do \
		echo "== bench/$$name.py"; $(BIN)/python bench/$$name.py; done

lint: install
	$(BIN)/ruff format --check radfed server client tests bench
	$(BIN)/ruff check radfed server client tests bench
	$(BIN)/lint-imports

types: install
	$(BIN)/mypy

# The whole gate, as CI runs it: format, lint, the import contract, mypy, the tests.
check: lint types test

format: install
	$(BIN)/ruff format radfed server client tests bench
	$(BIN)/ruff check --fix radfed server client tests bench

clean:
	rm -rf $(VENV) data runs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
