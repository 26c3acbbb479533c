# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv itself.
# CPU machines get the small CPU build of PyTorch; GPU users override it, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= test,dev,triton,examples
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.segkd-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core, at most 4 (each imports torch). `make test PYTEST_WORKERS=0` runs serially.
PYTEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")
XDIST := -n $(PYTEST_WORKERS) --dist loadfile
LINT_PATHS := src tests examples benchmarks tools

.PHONY: install demo quickstart test test-other-cpus lint format typecheck pytest fuzz bench clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out runs/demo
	$(BIN)/python examples/plot_hwd_weights.py --out runs/demo \
		--student-ckpt runs/demo/hwd_seed0/best.pt --teacher-ckpt runs/demo/teacher/best.pt
	$(BIN)/python examples/report.py runs/demo --out runs/demo

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

# The deep hypothesis profile: 10,000 cases per fuzz test (about 12 minutes on 2 cores). CI runs the short "ci" profile.
fuzz: $(STAMP)
	SEGKD_HYPOTHESIS_PROFILE=deep OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/fuzz -q --hypothesis-show-statistics

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_channel_kl.py --device cpu --out bench_cpu.json

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test: lint typecheck pytest

# The numerically sensitive tests again under PyTorch's other CPU kernel sets (ATEN_CPU_CAPABILITY), so that a
# tolerance that holds on this machine's vector kernels only fails here first. Users' CPUs are not ours.
# The Triton tests are left out: the interpreter runs the kernels in NumPy, which that variable does not touch.
NUMERIC_TESTS ?= src/segkd tests/ops tests/losses tests/fuzz tests/testing tests/test_docs.py tests/test_checks.py
test-other-cpus: $(STAMP)
	@caps=$$($(BIN)/python tools/other_cpu_capabilities.py) && for cap in $$caps; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap: $(NUMERIC_TESTS)"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m "not triton" $(XDIST) $(PYTEST_ARGS) $(NUMERIC_TESTS) \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
