# Two entry points (see README): `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cachekit-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) -e '.[test,report]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import cachekit, torch, open_clip, h5py" && touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cachekit demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest

reliability: $(STAMP)
	$(PY) -m tests.harness.reliability --out docs/reliability.md

clean:
	rm -rf cache/*.h5 cache/*.parts cache/*.results cache/demo build *.egg-info

.PHONY: venv demo test test-all reliability clean
