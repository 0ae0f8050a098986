# The README's commands: `make demo`, `make test` (the fast tier), `make test-all` (fast and slow tiers).
# Each creates the virtual environment when it is missing and installs the project with the pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmms-quant-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTEST := $(OFFLINE) $(PY) -m pytest -q --durations=15

.PHONY: demo test test-slow test-all install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/lmms-quant demo

# the fast tier: everything but the tests marked slow (under 10 minutes on 2 cores)
test: $(STAMP)
	$(PYTEST) -m "not slow"

# the slow tier: end-to-end runs through the real CLIs, parity on the larger tiny models
test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: test test-slow

clean-venv:
	rm -rf $(VENV)
