#!/usr/bin/env bash
# The prepared device check: one call, under 6 minutes on one GPU, no internet needed.
# On a fresh GPU machine: stage first, where pip works (tests/gpu/stage_device_check.sh).
# What it checks and how to read the report: docs/device_check.md.
#
#   bash tests/gpu/device_check.sh [--out DIR] [device_check.py flags ...]
#   MEGATRON_LM_PATH=/opt/Megatron-LM bash tests/gpu/device_check.sh --out /tmp/dc
#
# Knobs (environment):
#   PYTHON=python3            the interpreter that has torch (CUDA build on a GPU machine)
#   MEGATRON_LM_PATH=DIR      a Megatron-LM checkout (pretrain_gpt.py): enables the entry-path
#                             check, and provides megatron.core when none is installed
#   C2R_WHEEL_DIR=.whl        wheels (megatron-core and what it needs) installed offline into a
#                             temporary directory when megatron.core does not import
#                             (default .gpu_stage/wheels when staged, with MEGATRON_LM_PATH
#                             .gpu_stage/Megatron-LM unless set, even to empty)
#   DEVICE_CHECK_TIMEOUT=340  seconds before the whole check is stopped
# Without CUDA it runs the CPU parts and lists what it skipped (CI does this).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
# What tests/gpu/stage_device_check.sh staged (.gpu_stage/), unless told otherwise.
STAGED="$ROOT/.gpu_stage"
if [[ -z "${C2R_WHEEL_DIR:-}" && -d "$STAGED/wheels" ]]; then C2R_WHEEL_DIR="$STAGED/wheels"; fi
if [[ -z "${MEGATRON_LM_PATH+set}" && -f "$STAGED/Megatron-LM/pretrain_gpt.py" ]]; then
  export MEGATRON_LM_PATH="$STAGED/Megatron-LM"
fi
WHEELS="${C2R_WHEEL_DIR:-$ROOT/.whl}"
TIMEOUT="${DEVICE_CHECK_TIMEOUT:-340}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Found, not imported (importing takes seconds); device_check.py reports what it really loaded.
have_mcore() {
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.core') is None)" \
    >/dev/null 2>&1
}

# 1. megatron.core: installed, else the Megatron-LM checkout's, else offline wheels.
if have_mcore; then
  used="installed megatron.core"
elif [[ -n "${MEGATRON_LM_PATH:-}" && -f "$MEGATRON_LM_PATH/megatron/core/__init__.py" ]]; then
  export PYTHONPATH="$PYTHONPATH:$MEGATRON_LM_PATH"
  used="megatron.core from MEGATRON_LM_PATH=$MEGATRON_LM_PATH"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/c2r_site.XXXXXX")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
  used="megatron.core from wheels in $WHEELS (installed to $site)"
else
  echo "device_check: error: megatron.core does not import with $PY: install megatron-core, set" \
    "MEGATRON_LM_PATH to a Megatron-LM checkout, or put its wheels in C2R_WHEEL_DIR=$WHEELS" >&2
  exit 2
fi
have_mcore || { echo "device_check: error: megatron.core still does not import ($used)" >&2; exit 2; }
echo "device_check: python $("$PY" -c 'import sys; print(sys.executable)'); $used;" \
  "Megatron-LM checkout: ${MEGATRON_LM_PATH:-none (entry-path check skipped)}"

# 2. The checks (tests/gpu/device_check.py); the report path is printed at the end.
set +e
timeout --signal=TERM --kill-after=20 "$TIMEOUT" "$PY" "$ROOT/tests/gpu/device_check.py" "$@"
status=$?
set -e
if [[ $status -eq 124 ]]; then
  echo "device_check: error: stopped after DEVICE_CHECK_TIMEOUT=${TIMEOUT}s (lower --experts/--reps)" >&2
fi

# 3. The CUDA tests that need no NCCL (row paths at P = 4 and 8 with empty ranks and T = 0,
#    BigMac's TE experts, the flex invariant on CUDA), when CUDA and pytest are there; the sync
#    audit already ran above.
if [[ " $* " != *" --cpu "* ]] && "$PY" -c "import torch, pytest, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
  set +e
  (cd "$ROOT" && timeout --kill-after=10 "${DEVICE_TESTS_TIMEOUT:-90}" "$PY" -m pytest -q -p no:cacheprovider \
    tests/gpu/test_cuda_paths.py tests/gpu/test_bigmac_gpu.py tests/gpu/test_flex_gpu.py -k "not sync_budget")
  tests_status=$?
  set -e
  echo "device_check: CUDA tests exit status $tests_status"
  if [[ $status -eq 0 && $tests_status -ne 0 ]]; then status=1; fi
fi
exit "$status"
