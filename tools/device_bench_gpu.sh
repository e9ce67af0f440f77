#!/usr/bin/env bash
# `make bench-gpu` on a lent GPU machine (the workplace's `device` tool), which has torch, h5py, click and numpy but
# no network and no open_clip. Three steps:
#   here:    make wheels      # once: open_clip_torch, ftfy, wcwidth into .whl/ (git ignores it)
#   device:  run(command="bash tools/device_bench_gpu.sh", carry=[".whl"], timeout_s=600)
#   here:    copy benchmarks.md from the run's files over docs/benchmarks.md (its gpu-* sections are filled in)
# Dry run of the same steps on a CPU: bash tools/device_bench_gpu.sh --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null 2>&1 || { echo "device-bench-gpu: no wheels in .whl/; fix: make wheels, then carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/bench-gpu}"
mkdir -p "$out"
cp docs/benchmarks.md "$out/benchmarks.md"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# 9 minutes at most, so a 10-minute call always returns what was written.
set -o pipefail
PY=python3 timeout 540 tools/bench_gpu.sh --docs "$out/benchmarks.md" --out "$out/bench-gpu.json" "$@" 2>&1 | tee "$out/log.txt"
