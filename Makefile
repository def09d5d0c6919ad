# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=
# two pytest workers, one test file each at a time, the heaviest files first (tests/conftest.py: HEAVY_FIRST;
# --no-loadscope-reorder keeps that order); most tests wait on Ray, subprocesses and imports, not on the CPU, so
# two share 2 cores well (TEST_WORKERS=0 runs everything in one process)
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: venv demo test test-deps test-cluster test-all test-unit lint bench clean

venv: $(STAMP)

# torch/torchvision are pinned to the releases that lie on these machines' disk (see ENVIRONMENT.md);
# elsewhere pip downloads the same versions.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,litert]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill pipeline --config examples/demo.yaml

# The ops e2e test runs a real Prometheus server and Pushgateway, the tracking UI test a headless Chromium (Debian
# packages; the tests start and stop them themselves). Installed here when missing and apt-get is usable;
# otherwise those tests are skipped.
test-deps:
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway chromium >/dev/null; \
	  else echo "note: install prometheus, prometheus-pushgateway and chromium to run tests/e2e/test_operations.py and tests/integration/test_mlflow_ui.py"; fi; \
	fi

# `make test`: everything but the cluster-operations tests (pytest marker `cluster`: each file starts a Ray
# cluster of its own and operates it as users do: tests/integration/test_multinode.py kills nodes of a 3-raylet
# cluster, tests/e2e/test_operations.py submits / stops / resubmits the pipeline with `ray job` and scrapes it with
# Prometheus; 15–16 min together). `make test-cluster` runs those, one at a time (two clusters at once on 2 cores
# race each other's node-death and job-stop deadlines). CI (.ci/run) runs both.
test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not cluster" $(XDIST) $(PYTEST_ARGS)

test-cluster: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m cluster $(PYTEST_ARGS)

test-all: test test-cluster

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

PACKAGE_DIRS := core images teacher teacher_cache student_train compress deploy cluster

# ruff over everything; mypy over the installed package's names (`distill.*`): the folders are its sub-packages
# only through pyproject's mapping, which mypy cannot follow, so .typecheck/distill/ links them into one tree
lint: $(STAMP)
	$(BIN)/ruff check distill $(PACKAGE_DIRS) tests bench
	rm -rf .typecheck && mkdir -p .typecheck/distill
	for f in distill/*.py; do ln -s ../../$$f .typecheck/distill/; done
	for d in $(PACKAGE_DIRS); do ln -s ../../$$d .typecheck/distill/$$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p distill

# benchmarks (minutes each; results go to BENCHMARKS.md by hand, with the command and the machine)
bench: $(STAMP)
	$(BIN)/python bench/teacher_cache.py
	test -d runs/demo/cache || $(MAKE) demo
	$(BIN)/python bench/student_train.py
	PYTHONPATH=. $(BIN)/python -m bench.sweep
	PYTHONPATH=. $(BIN)/python bench/ray_layout.py --contention
	PYTHONPATH=. $(BIN)/python bench/scale.py
	$(BIN)/distill pipeline --config bench/compress.yaml
	test -f runs/demo/compressed/report.json || $(MAKE) demo
	$(BIN)/python bench/litert.py

clean:
	rm -rf runs/demo
