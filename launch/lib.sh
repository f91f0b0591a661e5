# shellcheck shell=bash
# shellcheck disable=SC2034  # the c2r_* functions set arrays the sourcing script reads
# Shared by launch/slurm/pretrain.sbatch, launch/slurm/torchrun.sbatch and launch/local.sh
# (sourced, never run). Functions are prefixed c2r_; every knob is read by the calling script.
#
# What lives here (and why not in the scripts): reading the run config (one Python call that
# prints bash assignments, `megatron-c2r render --format bash`), the fail-fast checks, the restart and
# nsys argument blocks, the per-task prelude that derives RANK/WORLD_SIZE/... from SLURM, and the
# wait loop that turns a time-limit signal into checkpoint + requeue.

c2r_die() {  # one line on stderr, exit 1
  echo "${C2R_SCRIPT:-megatron-c2r launch}: error: $*" >&2
  exit 1
}

c2r_log() {
  echo "${C2R_SCRIPT:-megatron-c2r launch}: $*" >&2
}

# c2r_parse_args CONFIG [--set k=v ...]  ->  CONFIG, SET_ARGS=(--set k=v ...)
c2r_parse_args() {
  CONFIG=${1:-}
  [[ -n $CONFIG && $CONFIG != -* ]] || c2r_die "no config given: usage: ${C2R_USAGE:-SCRIPT CONFIG.yaml [--set key=value ...]}"
  shift
  SET_ARGS=()
  while (($#)); do
    case $1 in
      --set) (($# >= 2)) || c2r_die "--set needs KEY=VALUE"; SET_ARGS+=(--set "$2"); shift 2 ;;
      --set=*) SET_ARGS+=(--set "${1#--set=}"); shift ;;
      *) c2r_die "unexpected argument '$1': only CONFIG.yaml and --set key=value are accepted" ;;
    esac
  done
  [[ -f $CONFIG ]] || c2r_die "config not found: $CONFIG (paths are relative to $PWD; submit from the repository root)"
  CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")  # tasks may start elsewhere
}

# c2r_render: eval the config's launch knobs (CFG_*), env (C2R_ENV) and command (C2R_CMD).
# RENDER=host runs C2R_PYTHON here (needs PyYAML + torch + this repo); RENDER=container runs it
# in one task of CONTAINER_IMAGE; RENDER=auto tries the host and falls back to the container.
c2r_render() {
  local out rc=0 err
  err=$(mktemp)
  if [[ $RENDER != container ]]; then
    out=$(PYTHONPATH="$C2R_DIR${PYTHONPATH:+:$PYTHONPATH}" \
      "$C2R_PYTHON" -m megatron_c2r render "$CONFIG" "${SET_ARGS[@]}" --format bash 2>"$err") || rc=$?
    if ((rc == 2)); then  # the config itself is wrong: its one-line message says what to fix
      cat "$err" >&2; rm -f "$err"; exit 2
    fi
    if ((rc != 0)) && [[ $RENDER == host || -z $CONTAINER_IMAGE || $CONTAINER_IMAGE == none ]]; then
      tail -n 1 "$err" >&2; rm -f "$err"
      c2r_die "cannot render $CONFIG with C2R_PYTHON=$C2R_PYTHON (needs pyyaml and torch): install megatron-c2r on this host, or set CONTAINER_IMAGE so RENDER=auto renders inside the container"
    fi
  fi
  if [[ $RENDER == container ]] || ((rc != 0)); then
    [[ -n $CONTAINER_IMAGE && $CONTAINER_IMAGE != none ]] || c2r_die "RENDER=container needs CONTAINER_IMAGE"
    rc=0
    out=$(srun --nodes=1 --ntasks=1 --container-image="$CONTAINER_IMAGE" \
      --container-mounts="$C2R_DIR:$C2R_DIR" --container-workdir="$C2R_DIR" \
      python -m megatron_c2r render "$CONFIG" "${SET_ARGS[@]}" --format bash 2>"$err") || rc=$?
    if ((rc != 0)); then
      cat "$err" >&2; rm -f "$err"
      c2r_die "rendering $CONFIG inside $CONTAINER_IMAGE failed (exit $rc)"
    fi
  fi
  rm -f "$err"
  eval "$out"
}

# c2r_first_host: the head node (rank 0, rendezvous host) of the allocation. No `| head`: under
# pipefail, head exiting early kills scontrol with SIGPIPE on a long node list (exit 141).
c2r_first_host() {
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  echo "${hosts%%$'\n'*}"
}

# c2r_gpus_on_node: GPUs SLURM gave this node (or nvidia-smi's count; 0 when neither knows).
c2r_gpus_on_node() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ ${SLURM_GPUS_PER_NODE:-} =~ ([0-9]+)$ ]]; then  # "8" or "h100:8"
    echo "${BASH_REMATCH[1]}"
  else
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  fi
}

# c2r_check_job TASKS_PER_NODE: the allocation matches the config (nodes, GPUs, tasks).
c2r_check_job() {
  local want_tasks=$1 gpus tasks
  [[ -n $CONTAINER_IMAGE ]] || c2r_die "no container image: set slurm.container_image in $CONFIG or CONTAINER_IMAGE=nvcr.io/... (CONTAINER_IMAGE=none runs without a container)"
  [[ ${SLURM_JOB_NUM_NODES:-} == "$CFG_NNODES" ]] || c2r_die "config wants launch.nodes=$CFG_NNODES but the job has ${SLURM_JOB_NUM_NODES:-?} nodes: submit with sbatch --nodes=$CFG_NNODES (or --set launch.nodes=${SLURM_JOB_NUM_NODES:-N})"
  gpus=$(c2r_gpus_on_node)
  [[ $gpus == "$CFG_GPUS_PER_NODE" ]] || c2r_die "config wants launch.gpus_per_node=$CFG_GPUS_PER_NODE but the job has $gpus GPUs per node: submit with sbatch --gpus-per-node=$CFG_GPUS_PER_NODE (or --set launch.gpus_per_node=$gpus)"
  tasks=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}
  [[ $tasks == "$want_tasks" ]] || c2r_die "the job has $tasks tasks per node, this script needs $want_tasks: submit with sbatch --ntasks-per-node=$want_tasks"
}

# c2r_restart_args: RESTART_ARGS=(--save D --load D --exit-signal-handler [--exit-duration-in-mins N]).
# One path for save and load, so a requeued job resumes from its own last checkpoint; Megatron's
# signal handler checkpoints on SIGTERM (preemption, or our forward of the time-limit signal).
c2r_restart_args() {
  RESTART_ARGS=()
  if [[ -n $CKPT_DIR ]]; then
    mkdir -p "$CKPT_DIR"
    RESTART_ARGS+=(--save "$CKPT_DIR" --load "$CKPT_DIR" --exit-signal-handler)
  fi
  local mins=$EXIT_DURATION_MINS
  if [[ -z $mins && -n ${SLURM_JOB_END_TIME:-} && -n ${SLURM_JOB_START_TIME:-} ]]; then
    mins=$(((SLURM_JOB_END_TIME - SLURM_JOB_START_TIME) / 60 - EXIT_MARGIN_MINS))
  fi
  if [[ -n $mins ]]; then
    ((mins > 0)) || c2r_die "exit duration $mins min is not positive: the time limit is shorter than EXIT_MARGIN_MINS=$EXIT_MARGIN_MINS"
    RESTART_ARGS+=(--exit-duration-in-mins "$mins")
  fi
}

# c2r_profile_args: NSYS_STEPS=START-END -> PROFILE_ARGS for Megatron (cudaProfilerStart at
# START, stop at END on --profile-ranks) and NSYS_CMD, the nsys prefix whose capture range is
# exactly that window. Empty NSYS_STEPS: both empty.
c2r_profile_args() {
  PROFILE_ARGS=()
  NSYS_CMD=()
  [[ -n $NSYS_STEPS ]] || return 0
  if ! [[ $NSYS_STEPS =~ ^([0-9]+)-([0-9]+)$ ]] || ((BASH_REMATCH[1] >= BASH_REMATCH[2])); then
    c2r_die "NSYS_STEPS=$NSYS_STEPS must be START-END with START < END, e.g. 10-12"
  fi
  local start=${BASH_REMATCH[1]} end=${BASH_REMATCH[2]} ranks
  [[ $NSYS_RANKS =~ ^[0-9]+(,[0-9]+)*$ ]] || c2r_die "NSYS_RANKS=$NSYS_RANKS must be a comma list of ranks, e.g. 0,8"
  IFS=, read -r -a ranks <<<"$NSYS_RANKS"
  PROFILE_ARGS=(--profile --profile-step-start "$start" --profile-step-end "$end"
    --profile-ranks "${ranks[@]}")
  NSYS_CMD=(nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop
    --trace="$NSYS_TRACE" --force-overwrite=true)
  mkdir -p "$LOG_DIR/nsys"
}

# The per-task prelude, run by `bash -c` inside the container: "$@" is the command.
# C2R_TASK_ENV=rank (one task per GPU) derives the torch.distributed variables from SLURM when
# the enroot/pyxis hook did not set them; =node (torchrun) leaves them to torchrun.
# C2R_NSYS_IDS (comma list of ranks, or node ids for =node) are wrapped in nsys profile.
read -r -d '' C2R_TASK_SH <<'TASK' || true
set -euo pipefail
if [[ $C2R_TASK_ENV == rank ]]; then
  export RANK=${RANK:-$SLURM_PROCID}
  export WORLD_SIZE=${WORLD_SIZE:-$SLURM_NTASKS}
  export LOCAL_RANK=${LOCAL_RANK:-$SLURM_LOCALID}
  export MASTER_ADDR=${MASTER_ADDR:-$C2R_MASTER_ADDR}
  export MASTER_PORT=${MASTER_PORT:-$C2R_MASTER_PORT}
  id=$RANK
else
  id=$SLURM_NODEID
fi
if [[ -n ${MEGATRON_LM_PATH:-} && ! -f $MEGATRON_LM_PATH/pretrain_gpt.py ]]; then
  echo "task $id on $(hostname): error: Megatron-LM path missing: MEGATRON_LM_PATH=$MEGATRON_LM_PATH has no pretrain_gpt.py (mount a checkout there or set launch.megatron_lm)" >&2
  exit 2
fi
if [[ -n ${C2R_NSYS_IDS:-} && ,$C2R_NSYS_IDS, == *,$id,* ]]; then
  read -r -a nsys <<<"$C2R_NSYS_CMD"
  set -- "${nsys[@]}" --output="$C2R_NSYS_OUT/$C2R_TASK_ENV$id" "$@"
fi
exec "$@"
TASK

# c2r_run_step PID_VAR CMD...: run CMD (an srun) in the background and wait for it. SIGUSR1
# (sbatch --signal=B:USR1@..., before the time limit) and SIGTERM (preemption) are forwarded to
# the step as SIGTERM, so Megatron checkpoints and exits; after USR1 the job is requeued
# (REQUEUE=1) and resumes from CKPT_DIR. Returns the step's exit status.
c2r_run_step() {
  C2R_SIGNAL=""
  trap 'C2R_SIGNAL=USR1; c2r_log "time limit near: checkpointing, then requeue"; kill -TERM "$C2R_STEP_PID" 2>/dev/null || true' USR1
  trap 'C2R_SIGNAL=TERM; c2r_log "SIGTERM (preemption?): checkpointing"; kill -TERM "$C2R_STEP_PID" 2>/dev/null || true' TERM
  "$@" &
  C2R_STEP_PID=$!
  local rc
  while :; do
    rc=0
    wait "$C2R_STEP_PID" || rc=$?
    kill -0 "$C2R_STEP_PID" 2>/dev/null || break  # wait was only interrupted by a trap
  done
  trap - USR1 TERM
  if [[ $C2R_SIGNAL == USR1 && $REQUEUE == 1 ]]; then
    c2r_log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))), resuming from ${CKPT_DIR:-<no CKPT_DIR>}"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

# c2r_container_args: CONTAINER_ARGS for srun (pyxis). The repository, logs and checkpoints are
# mounted at the same path inside, and tasks start in the repository (relative paths in configs).
c2r_container_args() {
  CONTAINER_ARGS=()
  [[ $CONTAINER_IMAGE == none ]] && return 0
  local mounts=$C2R_DIR:$C2R_DIR dir
  for dir in "$LOG_DIR" "$CKPT_DIR"; do
    [[ -n $dir && $dir != "$C2R_DIR"/* ]] && mounts+=,$dir:$dir
  done
  [[ -n $CONTAINER_MOUNTS ]] && mounts+=,$CONTAINER_MOUNTS
  # enroot names a registry with '#' ([USER@][REGISTRY#]IMAGE[:TAG]): nvcr.io/nvidia/pytorch:25.09-py3
  # would be looked up on Docker Hub. Squashfs files (a path) and '#' names pass unchanged.
  local image=$CONTAINER_IMAGE
  if [[ $image == */* && $image != *.sqsh && $image != /* && $image != .* && $image != *'#'* \
    && ${image%%/*} == *[.:]* ]]; then
    image=${image%%/*}#${image#*/}
  fi
  CONTAINER_ARGS=(--container-image="$image" --container-mounts="$mounts"
    --container-workdir="$C2R_DIR")
}
