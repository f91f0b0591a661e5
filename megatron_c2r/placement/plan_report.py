"""The console report of ``megatron-c2r plan``: per-layer predictions and the locality/balance
trade-off, as plain text (pure Python: reads ``PlanLayer`` fields, imports nothing heavy).

    ranks/token (and nodes/token)   distinct EP ranks (nodes) a token reaches: identity, random,
                                    planned, and the planned gain
    busiest/mean                    the busiest EP rank's (node's) expected tokens over the mean
    trade-off                       the same, averaged over layers, planned at several bounds
                                    (``planner.plan_with_tradeoff``), so a user can pick one
"""

from __future__ import annotations

from typing import Optional, Sequence

_BASELINES = ("identity", "random", "planned")


def _mean(plans, field: str, key: str) -> float:
    return sum(getattr(p, field)[key] for p in plans) / len(plans)


def _row(label: str, vals: Sequence[float], loads: Optional[Sequence[float]]) -> str:
    ident, rand, planned = vals
    line = (f"{label:>5}  {ident:8.3f}  {rand:8.3f}  {planned:8.3f}  "
            f"{100 * (planned / ident - 1):+10.1f}%  {100 * (planned / rand - 1):+8.1f}%")
    if loads is not None:
        line += "   " + "  ".join(f"{v:8.3f}" for v in loads)
    return line


def _block(plans, per_token: str, busiest: str, what: str) -> list[str]:
    has_loads = all(getattr(p, busiest) is not None for p in plans)
    head = (f"{'layer':>5}  {'identity':>8}  {'random':>8}  {'planned':>8}  "
            f"{'vs identity':>11}  {'vs random':>9}")
    if has_loads:
        head += "   " + "  ".join(f"{name:>8}" for name in _BASELINES)
        offset = len(head) - 28  # where the load columns start
    title = f"{what}s per token"
    if has_loads:  # the second title starts over the load columns
        title = f"{title:<{offset}}busiest {what} / mean load"
    lines = [title, head]
    for i, p in enumerate(plans):
        loads = [getattr(p, busiest)[k] for k in _BASELINES] if has_loads else None
        lines.append(_row(str(i), [getattr(p, per_token)[k] for k in _BASELINES], loads))
    if len(plans) > 1:
        loads = [_mean(plans, busiest, k) for k in _BASELINES] if has_loads else None
        lines.append(_row("mean", [_mean(plans, per_token, k) for k in _BASELINES], loads))
    return lines


def _bound_note(plans) -> list[str]:
    """Which layers could not meet the requested bound, and what they met instead."""
    bounds = [p.load_bound for p in plans if p.load_bound]
    if not bounds:
        return []
    x = bounds[0]["max_load_imbalance"]
    misses = []
    for i, p in enumerate(plans):
        for level in ("rank", "node"):
            smallest = (p.load_bound or {}).get(f"smallest_{level}")
            if smallest is not None and smallest > x * (1 + 1e-9):
                how = "exact" if p.load_bound.get("smallest_exact") else "best found"
                misses.append(f"layer {i} {level}s: smallest achievable {smallest:.3f} ({how})")
    met = "met in every layer" if not misses else "not achievable in " + "; ".join(misses) + \
        ": planned under the smallest instead"
    return [f"--max-load-imbalance {x:g}: {met}"]


def format_plan_table(plans, exact: bool) -> str:
    """Per-layer predicted ranks/token (identity, random, planned, planned gain) and, when the
    plan has them, busiest rank load / mean; the same for nodes in a hierarchical plan."""
    how = "exact, from full top-k sets" if exact else "estimated from pair counts"
    lines = _block(plans, "predicted_ranks_per_token", "predicted_busiest_rank_load", "rank")
    lines.append(f"(predicted distinct EP ranks per token, {how}; busiest load exact)")
    if all(p.predicted_nodes_per_token is not None for p in plans):
        lines += _block(plans, "predicted_nodes_per_token", "predicted_busiest_node_load", "node")
        lines.append(f"(predicted distinct nodes per token, {how})")
    lines += _bound_note(plans)
    return "\n".join(lines)


def format_tradeoff(tradeoff: dict, chosen: Optional[float]) -> str:
    """``{bound or None: [PlanLayer per layer]}`` as one row per bound (means over layers), with
    the identity and random baselines first; '*' marks bounds some layer could not meet."""
    if not tradeoff:
        return ""
    any_plans = next(iter(tradeoff.values()))
    hier = all(p.predicted_nodes_per_token is not None for p in any_plans)
    cols = ["ranks/token", "busiest rank/mean"] + (
        ["nodes/token", "busiest node/mean"] if hier else [])
    fields = ["predicted_ranks_per_token", "predicted_busiest_rank_load"] + (
        ["predicted_nodes_per_token", "predicted_busiest_node_load"] if hier else [])
    lines = [f"locality/balance trade-off (mean over {len(any_plans)} layer(s); choose with "
             "--max-load-imbalance):", f"{'bound':>9}  " + "  ".join(f"{c:>17}" for c in cols)]

    def row(label: str, plans, key: str) -> str:
        return f"{label:>9}  " + "  ".join(f"{_mean(plans, f, key):17.3f}" for f in fields)

    lines += [row(name, any_plans, name) for name in ("identity", "random")]
    for bound, plans in tradeoff.items():
        label = "off" if bound is None else f"{bound:g}"
        missed = bound is not None and any(
            (p.load_bound or {}).get(f"smallest_{lv}") is not None
            and p.load_bound[f"smallest_{lv}"] > bound * (1 + 1e-9)
            for p in plans for lv in ("rank", "node"))
        label += ("*" if missed else "") + (" <" if bound == chosen else "")
        lines.append(row(label, plans, "planned"))
    lines.append("(< the plan written; * some layer cannot meet this bound: its smallest "
                 "achievable applies)")
    return "\n".join(lines)
