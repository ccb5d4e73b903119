#!/usr/bin/env bash
# A run on a Slurm cluster: one array task per fold (train-folds.sbatch), then one job that blends what they trained
# (blend.sbatch: make submit BLEND_ONLY=1), started once every task has ended, whatever its exit (afterany): a fold
# that failed is named in the blend's warnings instead of costing the submission. From the repo on a login node,
# after `make setup` on the shared file system (the jobs install nothing, and refuse a stale .venv):
#   DATA=data/plant-seedlings-classification CONFIG=configs/gpu.yaml RUN=gpu N_FOLDS=5 scripts/slurm/submit-folds.sh
# Settings travel in the environment (sbatch --export=ALL): DATA CONFIG RUN N_FOLDS FOLD_SEED ARGS. Resources: FOLD_GRES
# (gpu:1; empty: none) FOLD_CPUS (8) FOLD_TIME (04:00:00) for each fold, SUBMIT_GRES (gpu:1) SUBMIT_CPUS (8)
# SUBMIT_TIME (02:00:00) for the blend (it predicts every fold's test images with TTA), SBATCH_ARGS for both; the
# jobs' logs go to SLURM_LOGS (default: here).
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/slurm/check-venv.sh
export N_FOLDS="${N_FOLDS:-5}"
gres() { if [ -n "$1" ]; then echo "--gres=$1"; fi; }
# shellcheck disable=SC2046,SC2086 # gres and SBATCH_ARGS are words or nothing
folds=$(sbatch --parsable --export=ALL --array="0-$((N_FOLDS - 1))" $(gres "${FOLD_GRES-gpu:1}") \
  --cpus-per-task="${FOLD_CPUS:-8}" --time="${FOLD_TIME:-04:00:00}" --output="${SLURM_LOGS:-.}/slurm-%x-%A_%a.out" \
  ${SBATCH_ARGS:-} scripts/slurm/train-folds.sbatch)
# shellcheck disable=SC2046,SC2086
blend=$(sbatch --parsable --export=ALL --dependency="afterany:${folds}" $(gres "${SUBMIT_GRES-gpu:1}") \
  --cpus-per-task="${SUBMIT_CPUS:-8}" --time="${SUBMIT_TIME:-02:00:00}" --output="${SLURM_LOGS:-.}/slurm-%x-%j.out" \
  ${SBATCH_ARGS:-} scripts/slurm/blend.sbatch)
echo "folds: job ${folds} (tasks 0-$((N_FOLDS - 1))); blend: job ${blend}, once they have ended"
