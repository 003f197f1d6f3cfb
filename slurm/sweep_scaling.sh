#!/bin/bash
# Scaling sweep of the VAR paper: one training job per depth (6..30), each with the paper's
# hyperparameters for its size, run directories named by depth.
#
#   RECIPE=recipes/d16.yaml RUNS=runs/scaling slurm/sweep_scaling.sh \
#       data.train_shards=/data/in1k-tokens data.vae=/ckpt/vae_ch160v4096z32.pth
#
# Environment:
#   RECIPE   base recipe whose data/parallel/checkpoint settings all jobs share (required)
#   RUNS     parent of the run directories RUNS/d6 ... RUNS/d30 (default runs/scaling)
#   DEPTHS   depths to submit (default: the 12 sizes "6 8 10 12 14 16 18 20 22 24 27 30")
#   EPOCHS   optim.epochs for every job (default: the recipe's)
#   DRY_RUN=1  print the sbatch commands instead of submitting them
# Arguments are overrides passed to every job (after the per-depth ones, so they win).
#
# Per depth (REFERENCE.md): width 64*depth and heads = depth (the model's defaults), drop-path
# 0.1*depth/24, base_lr 1e-4 (8e-5 from d24), AdaLN gamma init alng 1e-3 (1e-4 at d24-d29,
# 1e-5 at d30), final LR wpe 0.1 (0.01 from d24), global batch 768 (1024 at d30).
set -euo pipefail

ROOT="${VAR_TRAIN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${RECIPE:?set RECIPE, e.g. RECIPE=recipes/d16.yaml}"
RUNS="${RUNS:-runs/scaling}"
DEPTHS="${DEPTHS:-6 8 10 12 14 16 18 20 22 24 27 30}"
SBATCH="${SBATCH:-sbatch}"

# Nodes of 8 GPUs per depth: more for the bigger models so that each finishes in similar time.
nodes_for_depth() {
    local depth="$1"
    if [[ "$depth" -le 12 ]]; then echo 1
    elif [[ "$depth" -le 20 ]]; then echo 2
    elif [[ "$depth" -le 24 ]]; then echo 4
    else echo 8
    fi
}

depth_overrides() {
    local depth="$1" base_lr alng wpe batch
    if [[ "$depth" -ge 24 ]]; then base_lr=8.0e-5; wpe=0.01; else base_lr=1.0e-4; wpe=0.1; fi
    if [[ "$depth" -ge 30 ]]; then alng=1.0e-5; elif [[ "$depth" -ge 24 ]]; then alng=1.0e-4; else alng=1.0e-3; fi
    if [[ "$depth" -ge 30 ]]; then batch=1024; else batch=768; fi
    local drop_path
    drop_path="$(awk -v d="$depth" 'BEGIN { printf "%.6g", 0.1 * d / 24 }')"
    echo "model.depth=${depth} model.embed_dim=null model.num_heads=null model.drop_path_rate=${drop_path}" \
         "model.alng=${alng} optim.base_lr=${base_lr} optim.wpe=${wpe} optim.global_batch_size=${batch}" \
         "run.output_dir=${RUNS}/d${depth} logging.wandb_run_name=scaling-d${depth}" \
         "${EPOCHS:+optim.epochs=${EPOCHS}}"
}

for depth in ${DEPTHS}; do
    # shellcheck disable=SC2046  # the overrides are words by design
    command=("${SBATCH}" --nodes "$(nodes_for_depth "${depth}")" --job-name "var-d${depth}"
             --export "ALL,RECIPE=${RECIPE},VAR_TRAIN_ROOT=${ROOT}"
             "${ROOT}/slurm/train.sbatch" $(depth_overrides "${depth}") "$@")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${command[@]}"; echo
    else
        "${command[@]}"
    fi
done
