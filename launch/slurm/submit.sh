#!/bin/bash
# Submit a run with the sbatch flags its config asks for (launch.nodes, launch.gpus_per_node and
# the slurm: section), so the allocation always matches what the job scripts check:
#
#   launch/slurm/submit.sh configs/mixtral_8x7b_c2r.yaml [--set key=value ...]
#   PATTERN=torchrun launch/slurm/submit.sh configs/olmoe_1b_7b_c2r.yaml --set launch.nodes=2
#   DRY_RUN=1 launch/slurm/submit.sh configs/mixtral_8x7b_c2r.yaml     # print the sbatch command
#
# Knobs: PATTERN (pretrain: one task per GPU | torchrun: one task per node), DRY_RUN, C2R_PYTHON
# (a Python with megatron-c2r installed on this login node, default python3), SBATCH_EXTRA (more
# sbatch flags, space-separated). Environment knobs of the job scripts (CONTAINER_IMAGE,
# CKPT_DIR, NSYS_STEPS, ...) are passed on by sbatch.
set -euo pipefail

C2R_SCRIPT=submit.sh
C2R_USAGE="launch/slurm/submit.sh CONFIG.yaml [--set key=value ...]"
C2R_DIR=${C2R_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source=launch/lib.sh
source "$C2R_DIR/launch/lib.sh"

PATTERN=${PATTERN:-pretrain}
DRY_RUN=${DRY_RUN:-0}
SBATCH_EXTRA=${SBATCH_EXTRA:-}
C2R_PYTHON=${C2R_PYTHON:-python3}
RENDER=host
CONTAINER_IMAGE=none

case $PATTERN in
  pretrain) TASKS_PER_NODE=per-gpu ;;
  torchrun) TASKS_PER_NODE=1 ;;
  *) c2r_die "PATTERN=$PATTERN must be pretrain or torchrun" ;;
esac
c2r_parse_args "$@"
c2r_render
[[ $TASKS_PER_NODE == per-gpu ]] && TASKS_PER_NODE=$CFG_GPUS_PER_NODE

SBATCH_ARGS=(--nodes="$CFG_NNODES" --gpus-per-node="$CFG_GPUS_PER_NODE"
  --ntasks-per-node="$TASKS_PER_NODE" --job-name="$CFG_JOB_NAME")
[[ -n $CFG_PARTITION ]] && SBATCH_ARGS+=(--partition="$CFG_PARTITION")
[[ -n $CFG_ACCOUNT ]] && SBATCH_ARGS+=(--account="$CFG_ACCOUNT")
[[ -n $CFG_QOS ]] && SBATCH_ARGS+=(--qos="$CFG_QOS")
[[ -n $CFG_TIME_LIMIT ]] && SBATCH_ARGS+=(--time="$CFG_TIME_LIMIT")
[[ $CFG_EXCLUSIVE == 1 ]] && SBATCH_ARGS+=(--exclusive)
read -r -a EXTRA <<<"$SBATCH_EXTRA"
SUBMIT=(sbatch "${SBATCH_ARGS[@]}" "${EXTRA[@]}" "$C2R_DIR/launch/slurm/$PATTERN.sbatch" "$CONFIG" "${SET_ARGS[@]}")

if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${SUBMIT[@]}"
  echo
  exit 0
fi
cd "$C2R_DIR"  # the job scripts find the repository through SLURM_SUBMIT_DIR
mkdir -p logs  # their #SBATCH --output=logs/%x-%j.out
"${SUBMIT[@]}"
