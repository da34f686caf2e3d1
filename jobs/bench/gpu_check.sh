#!/usr/bin/env bash
# The device check as one command on a CUDA machine; prints one table (about 5-8 min):
#   bash jobs/bench/gpu_check.sh [jobs/bench/benchmark_gpu.py options]      # e.g. --no-compile, --ray-steps 8
#   bash jobs/bench/gpu_check.sh --family sdxl --batch 1 --no-compile        # the SDXL row, 1024 px
# Python: .venv when the project is installed there (`make install TORCH_SPEC=torch`), else the
# machine's python3 plus the wheels carried in .whl/ (docs/benchmarks.md, "The device check").
# The table also goes to $OUT/gpu_check.txt (out/ when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=python3
# A wheel larger than one device call may carry (ray's) travels split (`split -b 60M W.whl
# .whl/W.whl.part-`), its parts carried by successive calls; joined here before the install.
for first in .whl/*.whl.part-aa; do
  [ -e "$first" ] || continue
  whl="${first%.part-aa}"
  cat "$whl".part-* > "$whl"
  # a part missing (a call that did not carry it) leaves a truncated zip: say so, not pip
  python3 -m zipfile -t "$whl" >/dev/null 2>&1 || { echo "$whl: parts missing or damaged ($(ls "$whl".part-* | wc -l) found)"; rm -f "$whl"; }
done
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/platform" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
LOG="${OUT:-out}/gpu_check.txt"
mkdir -p "$(dirname "$LOG")"
timeout "${GPU_CHECK_SECONDS:-470}" "$PY" jobs/bench/benchmark_gpu.py "$@" 2>&1 | tee "$LOG"
