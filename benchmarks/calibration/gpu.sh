#!/usr/bin/env bash
# The one prepared command for the calibration run on the GPU machine (one H200, no
# network): install the carried wheels, run the grid, pack the results into $OUT.
#   device tool: run(command="bash benchmarks/calibration/gpu.sh", carry=[".whl"], timeout_s=600)
# Back here: tar xzf <files_at>/calibration-results.tgz -C benchmarks/results
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
name="${1:-h200-$(date -u +%Y%m%dT%H%M%SZ)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
python3 benchmarks/calibration/run.py --name "$name" --work /tmp/peftgen-calibration \
    --timeout-s 300 || status=$?
# $OUT takes at most 8 files: the whole results folder travels as one archive.
if [ -n "${OUT:-}" ] && [ -d "benchmarks/results/$name" ]; then
    tar czf "$OUT/calibration-results.tgz" -C benchmarks/results "$name"
fi
exit "$status"
