#!/bin/bash
# The one place that installs megatron-c2r on top of an NGC PyTorch image. docker/Dockerfile RUNs
# it; on a bare NGC container (e.g. a pyxis job without our image) run it the same way:
#
#   MEGATRON_LM_TAG=auto INSTALL_APEX=0 bash docker/install.sh      # from the repository root
#
# The image already has torch, transformer-engine and NCCL built for each other: nothing here may
# replace them. Every pip install is --no-deps (our other requirements, PyYAML/tqdm/numpy, ship
# with the image) and the image's pip constraint file (PIP_CONSTRAINT) stays in force; the
# versions of torch, transformer-engine and NCCL are compared before and after.
#
# Knobs:
#   MEGATRON_LM_TAG   Megatron-LM git tag for pretrain_gpt.py and megatron/training
#                     (auto: core_v<the image's megatron-core>, else MEGATRON_LM_DEFAULT_TAG)
#   MEGATRON_LM_DEFAULT_TAG  default core_v0.16.1 (our minimum megatron-core)
#   MEGATRON_LM_PATH  where to clone it (default /opt/Megatron-LM, what configs/ point at)
#   INSTALL_APEX=1    build NVIDIA apex from source if the image lacks it (slow; optional:
#                     Megatron uses transformer-engine kernels and only warns without apex)
set -euo pipefail

MEGATRON_LM_TAG=${MEGATRON_LM_TAG:-auto}
MEGATRON_LM_DEFAULT_TAG=${MEGATRON_LM_DEFAULT_TAG:-core_v0.16.1}
MEGATRON_LM_PATH=${MEGATRON_LM_PATH:-/opt/Megatron-LM}
MEGATRON_LM_REPO=${MEGATRON_LM_REPO:-https://github.com/NVIDIA/Megatron-LM.git}
INSTALL_APEX=${INSTALL_APEX:-0}
APEX_REPO=${APEX_REPO:-https://github.com/NVIDIA/apex.git}
PIP=(python -m pip install --no-cache-dir --no-deps --no-build-isolation)
cd "$(dirname "$0")/.."

die() { echo "docker/install.sh: error: $*" >&2; exit 1; }
stack_versions() {  # the versions nothing here may change
  python - <<'PY'
import importlib.metadata as md

import torch

for name in ("torch", "transformer_engine", "transformer-engine", "nvidia-nccl-cu12", "nvidia-nccl-cu13"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        pass
try:  # the NCCL torch is linked against (no GPU needed)
    print("nccl", torch.cuda.nccl.version())
except Exception as exc:  # noqa: BLE001 (CPU-only torch)
    print("nccl n/a", type(exc).__name__)
PY
}

# 1. What the image brings.
BEFORE=$(stack_versions)
echo "$BEFORE"
python -c "import transformer_engine" || die "transformer_engine is not importable: use an NGC PyTorch image (nvcr.io/nvidia/pytorch:YY.MM-py3)"
IMAGE_MCORE=$(python -c "import megatron.core as m; print(m.__version__)" 2>/dev/null || true)
echo "megatron-core in the image: ${IMAGE_MCORE:-none}"

# 2. Megatron-LM at the tag matching the image's megatron-core (pretrain_gpt.py, megatron/training).
if [[ $MEGATRON_LM_TAG == auto ]]; then
  MEGATRON_LM_TAG=${IMAGE_MCORE:+core_v$IMAGE_MCORE}
  MEGATRON_LM_TAG=${MEGATRON_LM_TAG:-$MEGATRON_LM_DEFAULT_TAG}
fi
git clone --depth 1 --branch "$MEGATRON_LM_TAG" "$MEGATRON_LM_REPO" "$MEGATRON_LM_PATH"
[[ -f $MEGATRON_LM_PATH/pretrain_gpt.py ]] || die "$MEGATRON_LM_TAG has no pretrain_gpt.py"
if [[ -z $IMAGE_MCORE ]]; then  # no megatron-core in the image: install the checkout's
  "${PIP[@]}" -e "$MEGATRON_LM_PATH"
fi

# 3. apex: optional. Report it; build it only when asked.
if python -c "import apex" 2>/dev/null; then
  echo "apex: present"
elif [[ $INSTALL_APEX == 1 ]]; then
  "${PIP[@]}" -v --config-settings "--build-option=--cpp_ext" \
    --config-settings "--build-option=--cuda_ext" "git+$APEX_REPO"
else
  echo "apex: absent (fine: Megatron falls back to transformer-engine/torch kernels; build it with --build-arg INSTALL_APEX=1)"
fi

# 4. megatron-c2r itself (its pure-Python requirements normally ship with the image).
python -c "import yaml, tqdm" 2>/dev/null || "${PIP[@]}" pyyaml tqdm
"${PIP[@]}" .

# 5. Nothing underneath moved, and everything imports.
AFTER=$(stack_versions)
[[ $BEFORE == "$AFTER" ]] || die "the torch/transformer-engine/NCCL stack changed: before: $BEFORE; after: $AFTER"
python -c "import megatron.core, transformer_engine, megatron_c2r; print('megatron-core', megatron.core.__version__, '| megatron-c2r', megatron_c2r.__version__)"
