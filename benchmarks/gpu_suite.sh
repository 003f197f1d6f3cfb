#!/usr/bin/env bash
# One-GPU benchmark suite (issue 13): prints the table BENCHMARKS.md records for a GPU, in under
# 8 minutes on one H100/H200-class GPU. See benchmarks/gpu_suite.py for what each row measures.
#
#   benchmarks/gpu_suite.sh                 # on a machine with one GPU
#   benchmarks/gpu_suite.sh --dry-run       # CPU: tiny models, checks every stage's plumbing (no figures)
#
# Extra arguments go to gpu_suite.py (--depths 16,30, --stages train,sample, --budget-s ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry_run=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry_run=1; done
if [[ $dry_run == 0 ]]; then
  # Fail fast (seconds, before any model is built) where there is no GPU.
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
    echo "error: no CUDA GPU visible (torch.cuda.is_available() is False): the GPU suite needs one GPU;" \
         "run 'benchmarks/gpu_suite.sh --dry-run' to check the plumbing on a CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi
# The whole suite stays under 8 minutes: stages stop starting at --budget-s (450 s), and a hard
# limit ends it at 470 s whatever happens (the rows printed so far stay on the screen).
exec timeout --signal=TERM --kill-after=10 470 "$PYTHON" benchmarks/gpu_suite.py "$@"
