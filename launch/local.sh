#!/bin/bash
# One machine, no SLURM. With GPUs: torchrun, one process per GPU (launch.gpus_per_node of them).
# Without GPUs: the CPU main job (`megatron-c2r train`, 2 gloo processes, tiny C2R pretraining).
#
#   launch/local.sh                                      # no GPU: configs/tiny_cpu.yaml on CPU
#   launch/local.sh configs/olmoe_1b_7b_c2r.yaml --set launch.nodes=1 \
#       --set launch.megatron_lm=$HOME/Megatron-LM       # one 8-GPU node
#   launch/local.sh configs/mixtral_8x7b_c2r.yaml --set launch.nodes=1 --set launch.gpus_per_node=4 \
#       --set megatron.pipeline-model-parallel-size=1 --set megatron.global-batch-size=32
#
# Knobs:
#   NGPUS             GPUs to assume (default: nvidia-smi -L count; 0 -> the CPU path)
#   RUN_ID            log directory name (default: date-time); logs in LOG_ROOT/RUN_ID/train.log
#   LOG_ROOT          default logs
#   CKPT_DIR          --save/--load (GPU path; default checkpoints/<slurm.job_name>; "" = none)
#   RESUME=1          CPU path: continue from the last checkpoint (megatron-c2r train --resume)
#   EXIT_DURATION_MINS  Megatron's --exit-duration-in-mins (GPU path)
#   NSYS_STEPS=10-12  nsys-profile those steps on ranks NSYS_RANKS (default 0), NSYS_TRACE
#   C2R_PYTHON        the Python with megatron-c2r installed (default python3), C2R_CLI (megatron-c2r)
set -euo pipefail

C2R_SCRIPT=local.sh
C2R_USAGE="launch/local.sh [CONFIG.yaml] [--set key=value ...]"
C2R_DIR=${C2R_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch/lib.sh
source "$C2R_DIR/launch/lib.sh"

NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
LOG_ROOT=${LOG_ROOT:-$C2R_DIR/logs}
RESUME=${RESUME:-0}
EXIT_DURATION_MINS=${EXIT_DURATION_MINS:-}
EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-10}
NSYS_STEPS=${NSYS_STEPS:-}
NSYS_RANKS=${NSYS_RANKS:-0}
NSYS_TRACE=${NSYS_TRACE:-cuda,nvtx,osrt,cublas}
RENDER=host
CONTAINER_IMAGE=none
C2R_PYTHON=${C2R_PYTHON:-python3}
C2R_CLI=${C2R_CLI:-megatron-c2r}
LOG_DIR=$LOG_ROOT/$RUN_ID
export CUDA_DEVICE_MAX_CONNECTIONS=1

# No GPU: the CPU main job. It reads the same YAML schema (megatron:, c2r:, cpu:).
if ((NGPUS == 0)); then
  (($#)) || set -- "$C2R_DIR/configs/tiny_cpu.yaml"
  c2r_parse_args "$@"
  CPU_ARGS=(--config "$CONFIG" "${SET_ARGS[@]}")
  ((RESUME)) && CPU_ARGS+=(--resume)
  mkdir -p "$LOG_DIR"
  c2r_log "no GPU: CPU main job, logs in $LOG_DIR/train.log"
  "$C2R_CLI" train "${CPU_ARGS[@]}" 2>&1 | tee -a "$LOG_DIR/train.log"
  exit "${PIPESTATUS[0]}"
fi

# GPUs: render the config, check it fits this machine, run torchrun.
c2r_parse_args "$@"
c2r_render
((CFG_NNODES == 1)) || c2r_die "config wants launch.nodes=$CFG_NNODES: local.sh runs one node (--set launch.nodes=1, or launch/slurm/*.sbatch)"
((CFG_GPUS_PER_NODE <= NGPUS)) || c2r_die "config wants launch.gpus_per_node=$CFG_GPUS_PER_NODE but this machine has $NGPUS GPUs: --set launch.gpus_per_node=$NGPUS"
export "${C2R_ENV[@]}"
if [[ -n ${MEGATRON_LM_PATH:-} && ! -f $MEGATRON_LM_PATH/pretrain_gpt.py ]]; then
  c2r_die "Megatron-LM path missing: MEGATRON_LM_PATH=$MEGATRON_LM_PATH has no pretrain_gpt.py: git clone https://github.com/NVIDIA/Megatron-LM and --set launch.megatron_lm=PATH"
fi
CKPT_DIR=${CKPT_DIR-$C2R_DIR/checkpoints/$CFG_JOB_NAME}
mkdir -p "$LOG_DIR"

c2r_restart_args
c2r_profile_args
[[ -z $NSYS_STEPS ]] || NSYS_CMD+=(--output="$LOG_DIR/nsys/local")
TORCHRUN_ARGS=(--standalone --nnodes=1 --nproc-per-node="$CFG_GPUS_PER_NODE")
CMD=("${NSYS_CMD[@]}" torchrun "${TORCHRUN_ARGS[@]}" "${C2R_CMD[@]:1}" "${RESTART_ARGS[@]}" "${PROFILE_ARGS[@]}")
printf '%q ' "${CMD[@]}" >"$LOG_DIR/command.sh"
c2r_log "$CFG_GPUS_PER_NODE GPUs of $NGPUS, logs in $LOG_DIR/train.log"
"${CMD[@]}" 2>&1 | tee -a "$LOG_DIR/train.log"
exit "${PIPESTATUS[0]}"
