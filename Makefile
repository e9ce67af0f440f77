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

hostile: $(STAMP)
	$(PY) -m tests.harness.hostile --out docs/hostile-inputs.md

reliability: $(STAMP)
	$(PY) -m tests.harness.reliability --out docs/reliability.md

clean:
	rm -rf cache/*.h5 cache/*.parts cache/*.results cache/demo build *.egg-info

.PHONY: venv demo test test-all hostile reliability clean

# Every GPU measurement of docs/benchmarks.md (~8 min on one H100/H200); refuses without CUDA (tools/bench_gpu.sh).
bench-gpu: $(STAMP)
	PY=$(PY) tools/bench_gpu.sh --docs docs/benchmarks.md

# The scale rehearsal of docs/scale.md at its three sizes (~1 h on a 2-core CPU; needs ~25 GB free disk).
bench-scale: $(STAMP)
	$(VENV)/bin/cachekit bench scale --classes 100 --shots 1,4 --views 10 --val 200 --test 1000 --ape-curve 100x200,100x600,100x1200 --threads 1 --docs docs/scale.md --docs-section scale-small
	$(VENV)/bin/cachekit bench scale --classes 1000 --shots 1,2 --views 10 --val 2000 --test 10000 --ape-curve 1000x1000 --threads 1 --max-memory 2GiB --docs docs/scale.md --docs-section scale-medium
	$(VENV)/bin/cachekit bench scale --classes 1000 --shots 1,4 --views 10 --val 2000 --test 10000 --ape-curve 100x1000,1000x500,1000x1000,1000x2000 --threads 1 --docs docs/scale.md --docs-section scale-large

# Wheels the GPU machine lacks (tools/device_bench_gpu.sh installs them there); .whl/ is git-ignored.
wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .whl open_clip_torch==$$($(PY) -c "import importlib.metadata as m; print(m.version('open_clip_torch'))") ftfy==$$($(PY) -c "import importlib.metadata as m; print(m.version('ftfy'))") wcwidth==$$($(PY) -c "import importlib.metadata as m; print(m.version('wcwidth'))")

.PHONY: bench-gpu bench-scale wheels

# Retrain the shipped mini-CLIP (docs/mini-clip.md): needs `apt-get install -y openclipart-png`; 15-30 min on 2 CPU cores.
mini-clip: $(STAMP)
	$(PY) tools/train_mini_clip.py train

.PHONY: mini-clip

# docs/results-mini-clip.md: every method, the ablations and the pictures on the mini-CLIP's held-out clip art
# (about 30 min on 2 CPU cores; resumable, keeps the hand-written notes below its marker).
results-mini-clip: $(STAMP)
	$(PY) tools/results_mini_clip.py --out docs/results-mini-clip.md

.PHONY: results-mini-clip
