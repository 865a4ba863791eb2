#!/usr/bin/env bash
# One kimi_jax process per node of a SLURM allocation (all of the node's GPUs each);
# the first node of the allocation serves the coordinator.
#
#   sbatch -N 8 --gpus-per-node 8 scripts/launch_slurm.sh [module args...]
#   sbatch -N 8 --gpus-per-node 8 scripts/launch_slurm.sh --checkpoint /lustre/kimi-k2-orbax \
#       --mesh expert=16,tensor=4 --chat "Hello" --json
#   MODULE=kimi_jax.serve sbatch -N 2 --gpus-per-node 8 scripts/launch_slurm.sh \
#       --checkpoint /lustre/kimi-k2-orbax --mesh data=1,expert=8,tensor=2 --rules dp_attention --port 8000
#
# Env: PORT (coordinator port, default 8476), PYTHON (default .venv/bin/python),
# MODULE (default kimi_jax.generate), KIMI_INIT_TIMEOUT (default 300 s).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-.venv/bin/python}
MODULE=${MODULE:-kimi_jax.generate}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export KIMI_COORDINATOR_ADDRESS="$HEAD:${PORT:-8476}" KIMI_NUM_PROCESSES=$SLURM_NNODES
args=$(printf ' %q' "$@")
# KIMI_PROCESS_ID comes from each task's own SLURM_PROCID, hence the single quotes.
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
  bash -c 'KIMI_PROCESS_ID=$SLURM_PROCID exec '"$PYTHON -m $MODULE$args"
