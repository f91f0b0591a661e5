#!/bin/bash
# Stage what the GPU machine lacks for the device check, on a machine with pip access, into
# ignored paths that travel with the checkout (.gpu_stage/, <= 64 MiB). docs/device_check.md.
#
#   bash tests/gpu/stage_device_check.sh MEGATRON_LM_SRC
#
#   MEGATRON_LM_SRC   a Megatron-LM checkout (work tree) or source tree at the tag matching
#                     MCORE_VERSION (core_v$MCORE_VERSION), or a bare git directory (then
#                     GIT_REF, default core_v$MCORE_VERSION, is archived from it). No network.
# Knobs (environment):
#   MCORE_VERSION=0.19.2      the megatron-core wheel (cp312: the GPU machine runs Python 3.12)
#   PYTHON=python3            the interpreter whose pip downloads it (any version: the download
#                             is for --python-version 3.12)
#   STAGE=.gpu_stage          where everything lands (ignored by git)
#
# What lands there:
#   $STAGE/wheels/megatron_core-*-cp312-*.whl   pip download --no-deps (binary only: its
#                             dataset helpers are prebuilt, so nothing compiles on the GPU machine)
#   $STAGE/wheels/pytest-*.whl, pluggy, iniconfig, packaging   for the CUDA tests in tests/gpu
#                             (packaging: megatron-core needs it too)
#   $STAGE/Megatron-LM/       the training files the entry path imports: pretrain_gpt.py,
#                             gpt_builders.py, model_provider.py (those the tag has), and
#                             megatron/training + megatron/legacy when the wheel lacks them
#                             (0.16); megatron/core is NOT copied (the wheel provides it)
# Then, on the GPU machine (the `run` tool carries ".gpu_stage"):
#   bash tests/gpu/device_check.sh --out "$OUT/device_check"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="${1:-}"
VERSION="${MCORE_VERSION:-0.19.2}"
PY="${PYTHON:-python3}"
STAGE="${STAGE:-$ROOT/.gpu_stage}"
REF="${GIT_REF:-core_v$VERSION}"
LIMIT_MIB=64

if [[ -z "$SRC" || ! -e "$SRC" ]]; then
  echo "stage_device_check: error: MEGATRON_LM_SRC=${SRC:-<missing>} must be a Megatron-LM" \
    "checkout or git directory at core_v$VERSION (first argument)" >&2
  exit 2
fi
rm -rf "$STAGE"
mkdir -p "$STAGE/wheels" "$STAGE/Megatron-LM"

# 1. The source tree at the tag (a work tree as is; a git directory through git archive).
tree="$SRC"
if [[ ! -f "$SRC/pretrain_gpt.py" ]]; then
  tree="$(mktemp -d "${TMPDIR:-/tmp}/c2r_mlm.XXXXXX")"
  trap 'rm -rf "$tree"' EXIT
  git --git-dir="$SRC" archive "$REF" | tar -x -C "$tree"
fi
[[ -f "$tree/pretrain_gpt.py" ]] || {
  echo "stage_device_check: error: $SRC has no pretrain_gpt.py at $REF" >&2; exit 2; }
tag_version="$(sed -n "s/^ *MINOR *= *//p;s/^ *MAJOR *= *//p;s/^ *PATCH *= *//p" \
  "$tree/megatron/core/package_info.py" 2>/dev/null | tr -d ' ' | paste -sd. -)"
if [[ -n "$tag_version" && "$tag_version" != "$VERSION" ]]; then
  echo "stage_device_check: error: $SRC is megatron-core $tag_version, not MCORE_VERSION=$VERSION:" \
    "check out core_v$VERSION (or set MCORE_VERSION=$tag_version)" >&2
  exit 2
fi

# 2. The megatron-core wheel for CPython 3.12 on x86-64 Linux (binary only, no dependencies:
#    the GPU machine's torch and numpy are used as they are).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d "$STAGE/wheels" "megatron-core==$VERSION"

#    And pytest (pure-Python wheels) for the CUDA tests in tests/gpu, which device_check.sh runs.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$STAGE/wheels" \
  "pytest>=8,<9" "pluggy>=1.5,<2" "iniconfig>=2,<3" "packaging>=24"

# 3. The training files: top-level Python modules the entry imports, and megatron/training and
#    megatron/legacy only if this wheel does not ship them (0.17+ wheels ship megatron.training).
for f in pretrain_gpt.py gpt_builders.py model_provider.py; do
  if [[ -f "$tree/$f" ]]; then cp "$tree/$f" "$STAGE/Megatron-LM/"; fi
done
wheels=("$STAGE"/wheels/megatron_core-*.whl)
wheel="${wheels[0]}"
listing="$("$PY" -m zipfile -l "$wheel")"
if ! grep -q "megatron/training/__init__.py" <<<"$listing"; then
  mkdir -p "$STAGE/Megatron-LM/megatron"
  cp -r "$tree/megatron/training" "$STAGE/Megatron-LM/megatron/"
  if [[ -d "$tree/megatron/legacy" ]]; then cp -r "$tree/megatron/legacy" "$STAGE/Megatron-LM/megatron/"; fi
  # no megatron/__init__.py: `megatron` stays a namespace package, so megatron.core comes from
  # the wheel and megatron.training from here
fi
# The dataset helpers: prebuilt in the binary wheel; say so instead of compiling anything.
grep -q "megatron/core/datasets/helpers_cpp" <<<"$listing" \
  || echo "stage_device_check: warning: $wheel has no prebuilt dataset helpers (mock data only)" >&2
find "$STAGE" -name "__pycache__" -prune -exec rm -rf {} +

size_mib=$(( $(du -sk "$STAGE" | cut -f1) / 1024 ))
if (( size_mib > LIMIT_MIB )); then
  echo "stage_device_check: error: $STAGE is ${size_mib} MiB, over the ${LIMIT_MIB} MiB a checkout carries" >&2
  exit 1
fi
echo "stage_device_check: staged megatron-core $VERSION ($(basename "$wheel")) and Megatron-LM" \
  "training files in $STAGE (${size_mib} MiB)"
