"""Megatron-LM GPT pretraining with C2R MoE layers: a drop-in for ``pretrain_gpt.py``.

    python -m megatron_c2r.megatron_lm <pretrain_gpt.py flags> [--c2r-* flags]

Takes every flag ``pretrain_gpt.py`` takes plus our ``--c2r-*`` group, and reuses the checkout's
own pieces (``pretrain_gpt.forward_step``, its dataset provider, ``model_provider``) with three
changes: our model builder (C2R block spec, MTP layers included), our flags
(``extra_args_provider``) and our per-iteration hooks around ``forward_step`` (router schedule,
``moe/c2r/*`` metrics).

Before anything starts, in this order, each a one-line error and exit status 2:
    1. flags that would make Megatron-LM build something else (``--modelopt-enabled``,
       ``--spec``, ...; ``preflight.refusal``),
    2. a missing Megatron-LM checkout (``$MEGATRON_LM_PATH``, or ``pretrain_gpt`` importable)
       or CUDA,
    3. Megatron's argument defaults and every model-build check that needs no GPU
       (``preflight.model_build_problem``: e.g. expert TP defaulting to TP = 2 under the dedup
       dispatcher), so no rank dies building the model after the nodes are allocated,
    4. ``--load`` of a stock checkpoint without a ``--dist-ckpt-strictness`` that lets our new
       router buffers start fresh (``preflight.resume_from_stock``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import List, Optional, Sequence

from megatron_c2r.megatron_lm import preflight

CHECKOUT_ENV = "MEGATRON_LM_PATH"
_CHECKOUT_HINT = (
    "a clone of https://github.com/NVIDIA/Megatron-LM (tag core_v0.16.1 or newer) containing "
    "pretrain_gpt.py"
)


class MissingRequirement(RuntimeError):
    """The cluster path cannot start here; the message says what is missing (one line)."""


def missing_requirements(checkout: Optional[str]) -> List[str]:
    """What stops Megatron-LM pretraining on this machine (empty list: nothing)."""
    missing = []
    if checkout is not None:
        if not os.path.isfile(os.path.join(checkout, "pretrain_gpt.py")):
            missing.append(f"Megatron-LM checkout: {checkout!r} has no pretrain_gpt.py ({_CHECKOUT_HINT})")
    elif importlib.util.find_spec("pretrain_gpt") is None:
        missing.append(
            f"Megatron-LM checkout: set launch.megatron_lm in the config or ${CHECKOUT_ENV} to "
            + _CHECKOUT_HINT
        )
    import torch

    if not torch.cuda.is_available():
        missing.append(
            "CUDA: Megatron-LM's training loop needs NVIDIA GPUs (on CPU run "
            "`megatron-c2r train --config configs/tiny_cpu.yaml`)"
        )
    return missing


def ensure_requirements(checkout: Optional[str] = None) -> None:
    """Raise MissingRequirement (one line) unless a checkout and CUDA are present; put the
    checkout first on ``sys.path`` (its top-level modules: pretrain_gpt, model_provider, ...)."""
    checkout = checkout if checkout is not None else os.environ.get(CHECKOUT_ENV) or None
    missing = missing_requirements(checkout)
    if missing:
        raise MissingRequirement("missing " + "; ".join(missing))
    if checkout is not None:
        path = os.path.abspath(checkout)
        if path not in sys.path:
            sys.path.insert(0, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run pretraining; ``argv`` (default ``sys.argv[1:]``) are pretrain_gpt.py + --c2r-* flags."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # Megatron's parser reads sys.argv
    try:
        problem = preflight.refusal_in_argv(sys.argv[1:])
        if problem:
            raise preflight.UnsupportedSetting(problem)
        ensure_requirements()
        problem = preflight.model_build_problem(sys.argv[1:])
        if problem:
            raise preflight.UnsupportedSetting(problem)
        stock = preflight.resume_from_stock(sys.argv[1:])
    except (MissingRequirement, preflight.UnsupportedSetting) as exc:
        print(f"megatron_c2r.megatron_lm: error: {exc}", file=sys.stderr)
        return 2
    if stock is not None and os.environ.get("RANK", "0") == "0":
        print(
            f"megatron_c2r.megatron_lm: --load {stock.checkpoint_dir} has no C2R router state: "
            f"C2R router buffers start fresh at iteration {stock.start_iteration}",
            flush=True,
        )

    # Heavy imports (megatron.training, torch, the checkout's modules) only past the checks.
    pretrain_gpt = importlib.import_module("pretrain_gpt")
    checkout_model_provider = importlib.import_module("model_provider").model_provider
    from megatron.core.enums import ModelType
    from megatron.training.global_vars import get_args

    from megatron_c2r import compat
    from megatron_c2r.megatron_lm.arguments import add_c2r_args
    from megatron_c2r.megatron_lm.hooks import megatron_lm_hooks
    from megatron_c2r.megatron_lm.model_provider import c2r_model_provider

    extra_args_provider = add_c2r_args
    if getattr(pretrain_gpt, "has_nvidia_modelopt", False):
        modelopt_args = pretrain_gpt.add_modelopt_args

        def extra_args_provider(parser):
            return modelopt_args(add_c2r_args(parser))

    datasets = pretrain_gpt.train_valid_test_datasets_provider
    datasets.is_distributed = True  # as pretrain_gpt.py's __main__ does
    hooks = megatron_lm_hooks()
    compat.run_megatron_pretrain(
        train_valid_test_dataset_provider=datasets,
        model_provider=c2r_model_provider(checkout_model_provider, get_args),
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=hooks.wrap_forward_step(pretrain_gpt.forward_step),
        extra_args_provider=extra_args_provider,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        get_embedding_ranks=getattr(pretrain_gpt, "get_embedding_ranks", None),
    )
    return 0
