# The two commands that do everything on a fresh machine: `make test` and `make demo`.
# Checks: `make lint` (ruff + mypy), `make test-fast` (without the slow tests), `make test-parity`
# (the torchvision parity suites in the reference environment; the CI runs all three, see .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.installed-lint
# The shared tools sit beside the clone (CI has a read-only copy there).
SHARED ?= ../shared

.PHONY: setup test test-fast test-parity lint demo demo-mobilenet clean

setup: $(STAMP)

# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU wheel, and
# installing it before the package keeps pip from resolving another (multi-GB) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# ruff, mypy and the stubs, pinned in the `lint` extra; only `make lint` needs them.
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $(LINT_STAMP)

test: setup
	$(PY) -m pytest -q

# Leaves out the tests listed in tests/slow_tests.txt (marked `slow` by tests/_markers.py).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Lint, format and types; the configuration is in pyproject.toml. `ruff check --fix . && ruff format .`
# repairs most of what the first two report.
lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The torchvision parity suites, in the reference environment that $(SHARED)/tools/reference-env.sh
# builds once (torch + torchvision, about 5 GB, cached in ~/.cache/fasterrcnn-reference-env). The
# project is not installed there (the cached env outlives any one clone): PYTHONPATH points at this
# checkout. What the package and pytest need is added under a constraint that pins the env's torch and
# torchvision exactly ('===', as reference-env.sh installs them), so pip can never swap in another build.
# FASTERRCNN_REQUIRE_TORCHVISION=1 turns the suites' skip (for a local `make test` without torchvision) into a failure.
test-parity:
	REF=$$(bash $(SHARED)/tools/reference-env.sh) && \
	"$$REF/bin/python" -m pip freeze | grep -iE '^(torch|torchvision)==' | sed 's/==/===/' \
	    > "$$REF/parity-constraints.txt" && \
	"$$REF/bin/python" -m pip install -q -c "$$REF/parity-constraints.txt" \
	    numpy pillow pycocotools pyyaml tqdm matplotlib pytest pytest-timeout && \
	FASTERRCNN_REQUIRE_TORCHVISION=1 PYTHONPATH=$(CURDIR) "$$REF/bin/python" -m pytest -q \
	    tests/ops/test_vs_torchvision.py tests/model/test_torchvision_parity*.py

# The main job on the built-in synthetic data: generate it (once), train the CPU demo recipe from
# scratch, evaluate, print the metrics and where the run's pictures are.
demo: setup
	$(VENV)/bin/fasterrcnn train $(ARGS)

# The small model's CPU demo: torchvision's real-time MobileNetV3-Large 320 FPN layout, from scratch, same data.
demo-mobilenet: setup
	$(VENV)/bin/fasterrcnn train --config fasterrcnn/configs/demo_mobilenet.yaml $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
