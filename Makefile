# The two commands that do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU wheel, and
# installing it before the package keeps pip from resolving another (multi-GB) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The main job on the built-in synthetic data: generate it (once), train the CPU demo recipe from
# scratch, evaluate, print the metrics and where the run's pictures are.
demo: setup
	$(VENV)/bin/fasterrcnn train $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
