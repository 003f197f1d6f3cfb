#!/bin/bash
# The paper's scaling sweep on Slurm: a thin wrapper over `var-train scaling plan --submit`, which
# plans one job per depth (6..30) with the size-rule table's hyperparameters, a micro-batch and
# accumulation valid for WORLD_SIZE GPUs per job that fit GPU_MEMORY by the dry run's estimate,
# and submits each to slurm/train.sbatch (run directories RUNS/d<depth>, one W&B group per sweep).
#
#   RECIPE=recipes/d16.yaml WORLD_SIZE=64 RUNS=runs/scaling slurm/sweep_scaling.sh \
#       data.train_shards=/data/in1k-tokens data.val_shards=/data/in1k-val-tokens \
#       data.vae=/ckpt/vae_ch160v4096z32.pth
#
# Environment:
#   RECIPE      base recipe whose data/parallel/checkpoint settings all jobs share (required)
#   WORLD_SIZE  GPUs per job (default 8); GPU_MEMORY GiB per GPU (default 80)
#   RUNS        parent of the run directories RUNS/d6 ... RUNS/d30 (default runs/scaling)
#   DEPTHS      depths to submit (default: the paper's 12, "6 8 10 12 14 16 18 20 22 24 27 30")
#   DRY_RUN=1   print the sbatch commands instead of submitting them
# Arguments are overrides passed to every job (they win over the table). See the plan first with
# `var-train scaling plan --recipe ... --world-size ...` (a table of sizes, memory, steps, PFLOP-days).
set -euo pipefail

ROOT="${VAR_TRAIN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${RECIPE:?set RECIPE, e.g. RECIPE=recipes/d16.yaml}"
args=(scaling plan --recipe "${RECIPE}" --world-size "${WORLD_SIZE:-8}" --gpu-memory "${GPU_MEMORY:-80}"
      --runs "${RUNS:-runs/scaling}")
if [[ -n "${DEPTHS:-}" ]]; then
    # shellcheck disable=SC2206  # a list of depths by design
    args+=(--depths ${DEPTHS})
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    args+=(--print)
else
    args+=(--submit --sbatch "${SBATCH:-sbatch}")
fi
export VAR_TRAIN_ROOT="${ROOT}"
exec ${VAR_TRAIN:-var-train} "${args[@]}" "$@"
