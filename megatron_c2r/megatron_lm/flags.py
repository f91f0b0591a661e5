"""What the Megatron-LM entry point is started with: the ``--c2r-*`` flag table and the checks only
the cluster path needs. Pure Python: no torch or Megatron import, so ``megatron-c2r render`` and the
SLURM scripts' batch host can use it.

``C2R_FLAGS`` is derived from the option dataclasses (every ``C2RRouterConfig`` field, then every
``C2ROptions`` field but ``enabled``/``router``: dispatcher, hierarchy, metrics_csv), so a new
option gets a flag. ``c2r_argv``
writes it (``render``) and ``megatron_lm.arguments.add_c2r_args`` parses it (Megatron's
``extra_args_provider``): one table, both directions.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Mapping, Tuple

from megatron_c2r.errors import ConfigError
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig

ENTRY_MODULE = "megatron_c2r.megatron_lm"  # python -m ENTRY_MODULE <megatron flags> <c2r flags>
# Flags our entry point needs from any Megatron-LM GPT run (Megatron itself asserts later).
REQUIRED_MEGATRON_FLAGS = (
    "num-layers", "hidden-size", "num-attention-heads", "seq-length",
    "max-position-embeddings", "micro-batch-size",
)  # fmt: skip
ROUTER_FIELDS = tuple(f.name for f in dataclasses.fields(C2RRouterConfig))


def format_value(value: Any) -> str:
    """One argv element for a YAML scalar (booleans as Megatron's ``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flag_kind(name: str, hint: Any, default: Any) -> Tuple[str, str]:
    """(flag, kind) for one option. kind: int | float | str | int_list | bool_on | bool_off."""
    dashed = name.replace("_", "-")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if hint is bool:
        return (f"--c2r-no-{dashed}", "bool_off") if default else (f"--c2r-{dashed}", "bool_on")
    if origin in (tuple, list):
        return f"--c2r-{dashed}", "int_list"
    return f"--c2r-{dashed}", hint.__name__


def _c2r_flags() -> Dict[str, Tuple[str, str]]:
    table = {}
    for cls in (C2RRouterConfig, C2ROptions):
        hints, instance = typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            if f.name in ("enabled", "router"):
                continue
            table[f.name] = _flag_kind(f.name, hints[f.name], getattr(instance, f.name))
    return table


# YAML key -> (flag, kind): every C2RRouterConfig field, then C2ROptions' own. Booleans
# that default to True get a --c2r-no-<name> flag. ``--c2r-disable`` (enabled: false) is added
# separately.
C2R_FLAGS: Dict[str, Tuple[str, str]] = _c2r_flags()


def c2r_argv(options: C2ROptions) -> List[str]:
    """The ``--c2r-*`` argv for ``options``; every set value is explicit (deterministic)."""
    argv: List[str] = []
    if not options.enabled:
        argv.append("--c2r-disable")
    values = dataclasses.asdict(options.router)
    values.update(
        (f.name, getattr(options, f.name))
        for f in dataclasses.fields(options)
        if f.name not in ("enabled", "router")
    )
    for key, (flag, kind) in C2R_FLAGS.items():
        value = values[key]
        if kind in ("bool_on", "bool_off"):
            if value == (kind == "bool_on"):
                argv.append(flag)
        elif value is not None:
            text = ",".join(str(v) for v in value) if kind == "int_list" else format_value(value)
            argv.extend([flag, text])
    return argv


def static_placement_problem(router: C2RRouterConfig) -> str:
    """On Megatron-LM the placement is fixed for a job (plans are applied to checkpoints between
    jobs), so group mode cannot re-plan in-run: a refresh interval would count and do nothing.
    The problem as one line without a prefix, or ``''``."""
    if router.mode == "group" and router.refresh_interval:
        return (
            f"c2r.refresh_interval={router.refresh_interval} with c2r.mode='group': Megatron-LM "
            "jobs keep one placement (re-plan between jobs with `megatron-c2r plan` + "
            "`megatron-c2r convert`); set c2r.refresh_interval: 0"
        )
    return ""


def check_static_placement(router: C2RRouterConfig, where: str) -> None:
    """Raise ConfigError ``'<where>: <problem>'`` if ``static_placement_problem`` finds one."""
    problem = static_placement_problem(router)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def megatron_lm_problem(megatron: Mapping[str, Any], options: C2ROptions) -> str:
    """What stops a validated run config from starting Megatron-LM GPT pretraining, as one line
    without a file prefix (the caller adds it), or ``''``. ``megatron`` maps flag names without
    ``--`` to YAML values."""
    for flag in REQUIRED_MEGATRON_FLAGS:
        if flag not in megatron:
            return f"megatron.--{flag} is required: add it"
    if "train-iters" not in megatron and "train-samples" not in megatron:
        return "megatron.--train-iters (or --train-samples) is required: add one"
    if "spec" in megatron:
        return (
            f"megatron.--spec={megatron['spec']!r}: our entry point builds the layer spec from "
            "the c2r: section; remove --spec"
        )
    return static_placement_problem(options.router) if options.enabled else ""
