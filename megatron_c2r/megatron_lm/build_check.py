"""The model-build checks that need no GPU, run on a command line before any node is allocated.

``render``/``pretrain`` (on a config) and the entry (on its argv) call :func:`model_build_problem`,
which does what Megatron-LM would do up to building our MoE layers, minus the GPU:

    1. Megatron's argument defaults: its own parser where the installed Megatron has one
       (``megatron.training`` is in the wheel from 0.17; a Megatron-LM checkout on the path
       gives it for 0.16), else the flags as given; then the defaulting of ``validate_args``
       that decides what the MoE layer is built with (``compat.apply_megatron_arg_defaults``:
       expert TP = TP when unset, the parameter dtype from --bf16/--fp16);
    2. Megatron's ``TransformerConfig`` from those args (its ``__post_init__`` checks);
    3. our ``--c2r-*`` options (``C2RRouterConfig.resolve`` against the experts, top-k and EP);
    4. with C2R on and ``c2r.dispatcher: dedup``: ``validate_dedup_config`` on that config
       (expert TP 1, no pad-to-capacity, no shared-expert overlap, no MoE CUDA graphs),
       exactly what ``C2RMoELayer`` raises at build on every rank;
    5. with ``--moe-token-dispatcher-type flex``: our dedup dispatcher would replace it
       (``c2r.dispatcher: megatron`` is how flex composes with our router), and what the
       installed flex refuses at build or would mis-route (``compat.flex_problem``: a backend
       this megatron-core lacks, TP x EP = 1, ncclep without a rank capacity or with a capacity
       factor it does not mask, shared-expert overlap on 0.16). With C2R off too: the
       baseline runs the same flex dispatcher.

Imports torch and megatron.core (lazily: importing this module is light).
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _flags_as_given(argv: Sequence[str]) -> argparse.Namespace:
    """``--a-b v`` -> ``a_b=v`` (bare -> True, several values -> list); no Megatron defaults."""
    args, name = {}, None
    for token in argv:
        if token.startswith("--"):
            name = token[2:].replace("-", "_")
            args[name] = True
        elif name is not None:
            value = _scalar(token)
            current = args[name]
            args[name] = value if current is True else (
                current + [value] if isinstance(current, list) else [current, value]
            )  # fmt: skip
    return argparse.Namespace(**args)


class UnknownFlags(ValueError):
    """Flags Megatron-LM's own parser does not know (a typo would otherwise fail at launch)."""

    def __init__(self, flags: Sequence[str]):
        super().__init__(f"Megatron-LM's argument parser does not know {', '.join(flags)}: check "
                         "the spelling against `pretrain_gpt.py --help`, or remove it")


def parser_note() -> Optional[str]:
    """One line when flags can only be checked by the model build, not by name (no Megatron-LM
    argument parser importable: megatron-core 0.16 without a Megatron-LM checkout), else None."""
    from megatron_c2r import compat

    if compat.megatron_argument_parser() is not None:
        return None
    return ("flags checked by the model build only, not by name: this megatron-core has no "
            "argument parser (megatron.training is in its wheel from 0.17); put a Megatron-LM "
            "checkout on PYTHONPATH to check every flag")


def megatron_args(argv: Sequence[str]) -> argparse.Namespace:
    """Megatron's parsed and defaulted args for ``argv`` (Megatron and ``--c2r-*`` flags)."""
    from megatron_c2r import compat
    from megatron_c2r.megatron_lm.arguments import add_c2r_args

    ours, rest = add_c2r_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False)
                              ).parse_known_args(list(argv))  # fmt: skip
    parser = compat.megatron_argument_parser()
    if parser is not None:
        args, unknown = parser.parse_known_args(rest)
        flags = [u for u in unknown if u.startswith("--")]
        if flags:
            raise UnknownFlags(flags)
    else:
        args = _flags_as_given(rest)
    vars(args).update(vars(ours))
    compat.apply_megatron_arg_defaults(args)
    return args


def model_build_problem(argv: Sequence[str]) -> Optional[str]:
    """The one-line reason our model would not build from ``argv``, or None (see module doc)."""
    from megatron_c2r import compat
    from megatron_c2r.megatron_lm.arguments import c2r_options_from_args

    try:
        args = megatron_args(argv)
    except SystemExit:  # Megatron's parser already printed its own message
        return "Megatron-LM's argument parser refused the command line (message above)"
    except UnknownFlags as exc:
        return str(exc)
    try:
        config = compat.transformer_config_from_args(args)
    except (AssertionError, ValueError, TypeError) as exc:
        return f"Megatron's TransformerConfig refuses these flags: {_one_line(exc)}"
    if not getattr(config, "num_moe_experts", None):
        return None
    tp, ep = int(args.tensor_model_parallel_size or 1), int(args.expert_model_parallel_size or 1)
    try:
        options = c2r_options_from_args(args)
        flex = config.moe_token_dispatcher_type == "flex"
        if flex and options.enabled and options.dispatcher == "dedup":
            return ("c2r.dispatcher='dedup' replaces Megatron's dispatcher but "
                    "moe_token_dispatcher_type='flex': set c2r.dispatcher: megatron "
                    "(--c2r-dispatcher megatron) to run our router with flex, or use alltoall")
        problem = compat.flex_problem(config, tp, ep)
        if problem is not None:
            return problem
        if not options.enabled:
            return None
        options.router.resolve(num_experts=config.num_moe_experts, topk=config.moe_router_topk,
                               ep_size=ep)  # fmt: skip
        if options.dispatcher == "dedup":
            from megatron_c2r.moe.dispatcher import validate_dedup_config

            validate_dedup_config(config, ep, int(args.expert_tensor_parallel_size))
    except ValueError as exc:
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
