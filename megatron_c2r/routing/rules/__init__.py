"""Routing rules: one small object per routing mode, built once per router.

A rule owns everything that differs between modes, so the router (``moe/router.py``) never
branches on a mode string:

    select(scores_TE, tables, group_bias_G)  -> indices_TK   which experts a token may use
    penalty(logits_TE, tables, ...)          -> 0-d fp32     mass outside the rule's allowed set
    violated_T(probs_TE, routing_map_TE, groups_T, tables, active) -> bool [T]   the statistic
    extra_stats_T(routing_map_TE, tables)    -> {name: [T]}  rule-specific statistics
    router_inputs(steps_active)              -> {name: float}  scheduled values select takes
    balance(tables)                          -> the groups balance losses / group bias act on
    constrained / needs_lists / group_limit / balance_limit                   schedule facts

``RoutingTables`` holds what a rule derives from the router's buffers (expert -> group map,
top-T lists, nodes); the router builds it lazily and drops it in one place after a load or
relabelling.

One family per file:
    base.py      RoutingTables, RoutingRule (the interface), TopKRule
    top_t.py     C2RTopTRule (the paper's top-T rule)
    limited.py   GroupRule / NodeRule (anchored) and GroupScoreRule / NodeScoreRule (Megatron's)
    balanced.py  GroupBalancedRule (MoGE)
    budgeted.py  BudgetedGroupRule / BudgetedNodeRule (``c2r.mean_budget``: relax the tokens
                 that lose most under the limit, mean blocks per token <= the budget)
    soft.py      SoftGroupRule / SoftNodeRule (``c2r.locality_bias_target``: a steered bias
                 toward the anchored blocks instead of a limit)

Adding a rule: subclass ``RoutingRule`` (or a limited rule), override what differs, name the
extra config fields its constructor takes in ``options``, add one entry to ``RULES`` (keyed by
mode, group selection and variant) and the mode name to ``routing.config.MODES``. Pure torch:
no Megatron imports, CPU-testable. Shape suffixes: see the legend in
``megatron_c2r/routing/__init__.py``.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from megatron_c2r.routing.rules.balanced import GroupBalancedRule
from megatron_c2r.routing.rules.base import RoutingRule, RoutingTables, TopKRule
from megatron_c2r.routing.rules.budgeted import BudgetedGroupRule, BudgetedNodeRule
from megatron_c2r.routing.rules.limited import GroupRule, GroupScoreRule, NodeRule, NodeScoreRule
from megatron_c2r.routing.rules.soft import SoftGroupRule, SoftNodeRule
from megatron_c2r.routing.rules.top_t import C2RTopTRule

__all__ = [
    "RULES", "VARIANTS", "BudgetedGroupRule", "BudgetedNodeRule", "C2RTopTRule", "GroupBalancedRule",
    "GroupRule", "GroupScoreRule", "NodeRule", "NodeScoreRule", "RoutingRule", "RoutingTables",
    "SoftGroupRule", "SoftNodeRule", "TopKRule", "build_rule", "rule_for_config",
]

# (mode, group_selection or None) -> rule class. One entry per rule; the variants of the
# anchored group / node rules (VARIANTS) are chosen by the config field that turns them on.
RULES: Dict[tuple, Type[RoutingRule]] = {
    ("topk", None): TopKRule,
    ("c2r", None): C2RTopTRule,
    ("group", "anchored"): GroupRule,
    ("group", "group_score"): GroupScoreRule,
    ("node", "anchored"): NodeRule,
    ("node", "group_score"): NodeScoreRule,
    ("group_balanced", None): GroupBalancedRule,
}
# config field -> {mode: rule class}: set (not None) -> that rule replaces the anchored one.
VARIANTS: Dict[str, Dict[str, Type[RoutingRule]]] = {
    "mean_budget": {"group": BudgetedGroupRule, "node": BudgetedNodeRule},
    "locality_bias_target": {"group": SoftGroupRule, "node": SoftNodeRule},
}


def build_rule(
    mode: str,
    group_selection: Optional[str],
    *,
    topk: int,
    num_groups: int,
    max_groups: int,
    **options,
) -> RoutingRule:
    """The rule for a (resolved) router config. ``group_selection`` matters only where a rule is
    registered with one (group and node modes); other modes ignore it. ``options``: the extra
    fields the rule's class names in ``options`` (e.g. the node layout)."""
    cls = RULES.get((mode, group_selection)) or RULES.get((mode, None))
    if cls is None:
        known = sorted({m for m, _ in RULES})
        raise ValueError(f"c2r.mode={mode!r} (group_selection={group_selection!r}) has no routing "
                         f"rule: use one of {', '.join(known)}")
    return cls(topk=topk, num_groups=num_groups, max_groups=max_groups, **options)


def rule_for_config(cfg, *, topk: int) -> RoutingRule:
    """The rule of a resolved ``C2RRouterConfig`` (``cfg.resolve(...)``): its mode, selection and
    the fields its class takes (``options``)."""
    cls = RULES.get((cfg.mode, cfg.group_selection)) or RULES.get((cfg.mode, None))
    for field, by_mode in VARIANTS.items():
        if getattr(cfg, field, None) is not None:
            cls = by_mode[cfg.mode]  # the config checked mode and group selection
    options = {name: getattr(cfg, name) for name in getattr(cls, "options", ())}
    return cls(topk=topk, num_groups=cfg.num_groups, max_groups=cfg.max_groups, **options)
