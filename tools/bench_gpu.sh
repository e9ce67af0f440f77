#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one run, sized for about 8 minutes on one H100/H200:
# extract vs bare encode_image (fp16 autocast, channels_last, Pillow and nvJPEG decoding), a SAFE epoch on cached
# maps vs the usual way, the full 80,000-point APE search at C=100 and C=1000 with 1,000 val, and a small scale
# rehearsal with SAFE and eval on the GPU. Each writes its section (gpu-*) of the --docs file; the targets go to
# the section "gpu".
#
#   tools/bench_gpu.sh --docs docs/benchmarks.md           # what `make bench-gpu` runs
#   tools/bench_gpu.sh --device cpu --tiny --docs /tmp/b.md  # dry run of the same steps at toy sizes (seconds)
#
# Without a visible CUDA device it refuses (exit 2) and measures nothing, unless --device cpu --tiny is given.
# Other options go to `cachekit bench gpu` (--workers N, --json, --out FILE, -q, --threads N).
# PY: the Python of the cachekit environment (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
device=cuda
tiny=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:?--device needs a value}"; shift 2 ;;
    --device=*) device="${1#--device=}"; shift ;;
    --tiny) tiny=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$device" in
  cuda*)
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "bench-gpu: no CUDA device is visible here (torch.cuda.is_available() is False); nothing was measured." >&2
      echo "fix: run it on a machine with a GPU, or dry-run the steps on the CPU: tools/bench_gpu.sh --device cpu --tiny --docs /tmp/b.md" >&2
      exit 2
    fi ;;
  *)
    if [ "$tiny" != 1 ]; then
      echo "bench-gpu: --device $device measures no GPU; fix: --device cuda, or add --tiny for the CPU dry run" >&2
      exit 2
    fi ;;
esac
exec "$PY" -m cachekit bench gpu --device "$device" ${args[@]+"${args[@]}"}
