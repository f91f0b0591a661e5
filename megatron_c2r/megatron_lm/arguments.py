"""Our ``--c2r-*`` flags on Megatron-LM's argument parser.

``add_c2r_args`` is the ``extra_args_provider`` our entry point hands to Megatron-LM's
``pretrain()`` (0.16/0.17) or ``parse_and_validate_args()`` (0.18+): it adds one argument group
and returns the parser, as Megatron expects. The flag table is ``megatron_lm.flags.C2R_FLAGS``,
the same table ``render`` writes argv from, so the two cannot drift apart.

    --c2r-disable                  baseline: stock router/dispatcher, our metrics still logged
    --c2r-mode topk|c2r|group      --c2r-top-t T   --c2r-num-groups G   --c2r-max-groups M
    --c2r-group-selection anchored|group_score     --c2r-expert-to-group 0,0,1,1,...
    --c2r-penalty-coeff F          --c2r-warmup-steps N   --c2r-refresh-interval R
    --c2r-no-track-collaboration   --c2r-no-check-finite-logits
    --c2r-dispatcher dedup|megatron   --c2r-hierarchy auto|flat|two_level
    --c2r-metrics-csv PATH
    (one flag per C2RRouterConfig field; booleans that default to true get --c2r-no-<name>)
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_c2r.megatron_lm.flags import C2R_FLAGS, ROUTER_FIELDS, check_static_placement
from megatron_c2r.moe.options import DISPATCHERS, HIERARCHIES, C2ROptions
from megatron_c2r.routing.config import AUX_LOSS_MAPS, GROUP_SELECTIONS, MODES, C2RRouterConfig

_CHOICES = {
    "mode": MODES, "group_selection": GROUP_SELECTIONS, "dispatcher": DISPATCHERS,
    "hierarchy": HIERARCHIES, "aux_loss_map": AUX_LOSS_MAPS,
}  # fmt: skip
_HELP = {
    "mode": "routing rule: topk (Megatron's, plus tracking), c2r (top-T lists), group (default)",
    "top_t": "length T of the collaborator lists (mode c2r)",
    "num_groups": "groups G (default: the expert-parallel size, one group per EP rank)",
    "max_groups": "groups a token may use (mode group); 1 sends every token to one rank",
    "group_selection": "anchored (top-1 expert's group first) or group_score (Megatron's rule)",
    "expert_to_group": "explicit partition: comma-separated group id per expert",
    "penalty_coeff": "collaboration penalty coefficient (0 = off)",
    "warmup_steps": "plain top-k for this many iterations while collaboration is tracked",
    "refresh_interval": "c2r mode: re-derive top-T lists every R iterations after warm-up from "
    "plain top-k's preference in that window (0 = never; group mode re-plans between jobs)",
    "track_collaboration": "do not count expert co-activation",
    "check_finite_logits": "do not check router logits for NaN/Inf (saves one small device-to-host "
    "sync per layer)",
    "dispatcher": "dedup (one row per destination rank) or megatron (--moe-token-dispatcher-type)",
    "hierarchy": "dedup across nodes: auto (two-level iff the EP group spans nodes), flat, or "
    "two_level (one row per destination node over the inter-node hop)",
    "gpus_per_node": "EP ranks per node for node routing; also simulated nodes for the dedup "
    "dispatcher (nodes = blocks of this many global ranks; unset: from the hostnames)",
    "aux_loss_map": "what Megatron's aux losses count under our rules: auto (default: preferred in "
    "node mode, constrained elsewhere), constrained (the load the experts get), preferred "
    "(plain top-k's map, as Megatron counts its node-limited routing)",
    "metrics_csv": "also append moe/c2r/* metrics to this CSV file",
}


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be comma-separated integers like 0,0,1,1"
        ) from None


def add_c2r_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``C2R`` argument group (Megatron's ``extra_args_provider`` protocol)."""
    group = parser.add_argument_group(title="C2R", description="megatron-c2r routing options")
    group.add_argument(
        "--c2r-disable", action="store_true",
        help="baseline: build Megatron's stock MoE layers (metrics are still logged)",
    )  # fmt: skip
    defaults = C2RRouterConfig()
    for key, (flag, kind) in C2R_FLAGS.items():
        dest = f"c2r_{key}"
        default = getattr(defaults, key) if key in ROUTER_FIELDS else getattr(C2ROptions(), key)
        help_text = _HELP.get(key, "a C2RRouterConfig field (docs/guide.md: Collaboration-constrained routing)")
        if kind in ("bool_on", "bool_off"):
            action = "store_true" if kind == "bool_on" else "store_false"
            group.add_argument(flag, dest=dest, action=action, help=help_text)
            continue
        kwargs = dict(dest=dest, default=default, help=help_text)
        if kind == "int_list":
            kwargs["type"] = _int_list
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
        if key in _CHOICES:
            kwargs["choices"] = _CHOICES[key]
        group.add_argument(flag, **kwargs)
    return parser


def c2r_options_from_args(args: argparse.Namespace) -> C2ROptions:
    """The ``C2ROptions`` our flags describe (raises ValueError naming the option on bad values)."""
    router = C2RRouterConfig(**{key: getattr(args, f"c2r_{key}") for key in ROUTER_FIELDS})
    if not args.c2r_disable:
        check_static_placement(router, "--c2r-*")
    own = {
        f.name: getattr(args, f"c2r_{f.name}")
        for f in dataclasses.fields(C2ROptions)
        if f.name not in ("enabled", "router")
    }
    return C2ROptions(enabled=not args.c2r_disable, router=router, **own)
