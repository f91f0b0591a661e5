"""Expert placement plans: which experts share an EP rank (and a node), and what that predicts.

Goal: few distinct destination ranks per token (= rows a per-rank dedup communicator ships),
optionally under a load bound, optionally hierarchical (nodes first, ranks inside each node).

    locality       mean distinct EP ranks (nodes) per token; exact on traces (full top-k sets),
                   estimated from pair counts on matrices (``partition.ranks_per_token_estimate``)
    balance        the busiest group's expected tokens over the mean (``expert_load_E``): an EP
                   step waits for its busiest rank, the inter-node hop for its busiest node
    bound          ``max_load_imbalance`` X: every group's expected load <= X x the mean, where
                   any placement achieves that; where none does, the smallest achievable bound
                   (exact for small E, the best found above) is applied and recorded instead.
                   A bound costs locality (REFERENCE.md section 10): ``plan_with_tradeoff``
                   plans several bounds so the user can choose.
    hierarchy      ``num_nodes`` N > 1: node n = EP ranks [n G, (n+1) G), G = P/N. Experts are
                   first split into N node groups (fewest nodes per token, node loads bounded),
                   then each node's experts into its G ranks (fewest ranks per token within the
                   node, rank loads bounded); swaps never cross nodes at the second level. Under
                   a bound a node split can leave hot experts no rank spread, so a bottom-up
                   plan (the bounded flat plan, ranks grouped into nodes) competes (``_place``).
                   One plan (P groups = ranks), applied by the same relabelling as a flat plan.

Search: exhaustive when E <= ``exact_max_experts`` (``exhaustive.py``; the bound filters the
enumeration; hierarchical plans enumerate rank partitions x node groupings); otherwise seeded
pairwise swaps (``partition.py``), and under a bound repair + bound-keeping swaps from the
unbounded plan, the identity, a load-balanced start, the greedy seed and random starts.
Never worse than the identity in the optimised objective when the identity meets the bound;
``max_load_imbalance=None`` reproduces the locality-only plans exactly. Deterministic for a seed.
Shape suffixes: the legend in ``megatron_c2r/placement/__init__.py`` (E, P, K, U, C as there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from megatron_c2r.errors import at_least, check_lower_bounds
from megatron_c2r.placement.exhaustive import (
    solve_exact,
    solve_exact_capped,
    solve_exact_hierarchical,
)
from megatron_c2r.placement.partition import (
    Limits,
    balanced_by_load,
    busiest_over_mean,
    fits_caps,
    greedy_seed,
    group_loads,
    identity_placement,
    objective_batch,
    random_placements,
    ranks_per_token_estimate,
    ranks_per_token_exact,
    refine_pairs,
    refine_trace,
    solve_capped,
    solve_heuristic,
    within_group_pairs,
)
from megatron_c2r.placement.plan_file import Plan, PlanLayer, expert_to_rank_from_groups
from megatron_c2r.placement.sources import LayerCollab

__all__ = [  # partition's objectives are part of the planner's API (tests, benchmarks)
    "PlannerConfig", "expert_load_E", "predicted_ranks_per_token", "plan_layer", "plan_layers",
    "make_plan", "plan_with_tradeoff", "assign_groups_to_ranks", "identity_placement",
    "within_group_pairs", "ranks_per_token_exact", "ranks_per_token_estimate",
    "random_placements",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    ep_size: int = at_least(1)
    seed: int = 0
    # Starts for the heuristic: greedy and identity always, then (restarts - 2) random ones.
    # On synthetic clustered routing at E=256/P=8, 12 restarts moved planned ranks/token by
    # < 0.1% versus 4, and 4 keeps a layer under 0.5 s of CPU.
    restarts: int = at_least(1, default=4)
    # Exhaustive search up to this many experts (12 experts over 4 ranks: 15,400 partitions);
    # 0: never exhaustive.
    exact_max_experts: int = at_least(0, default=12)
    # Random placements averaged for the "random" baseline.
    random_samples: int = at_least(1, default=16)
    # Exact-objective swap passes on traces (each pass tries the best `swap_candidates` by proxy).
    trace_passes: int = at_least(0, default=200, note=" (0 = no trace passes)")
    swap_candidates: int = at_least(1, default=48)
    # None: locality only. X >= 1: each rank's (and node's) expected tokens <= X x the mean.
    max_load_imbalance: Optional[float] = None
    # 1: flat. N > 1: nodes of ep_size / N consecutive ranks, planned nodes first.
    num_nodes: int = 1

    def __post_init__(self):
        check_lower_bounds(self)  # the bounds the fields declare (at_least)
        x = self.max_load_imbalance
        if x is not None and not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 1):
            raise ValueError(f"max_load_imbalance={x!r} must be a number >= 1 (busiest group "
                             "over the mean load) or None for no bound")
        if self.num_nodes < 1 or self.ep_size % self.num_nodes:
            raise ValueError(f"num_nodes={self.num_nodes} must be >= 1 and divide ep_size="
                             f"{self.ep_size}: nodes hold equal blocks of EP ranks")


# ------------------------------------------------------------------------------------------
# What a placement predicts
# ------------------------------------------------------------------------------------------
def expert_load_E(layer: LayerCollab) -> np.ndarray:
    """float64 [E]: expected tokens per expert, from what the source holds.

    Traces / dumps: tokens whose top-k set contains the expert. Matrices (tracker counts, pair
    matrices): row sum / (k - 1), since each of the expert's tokens pairs it with k - 1 others
    (exact for top-k routing, where every token has k distinct experts). A source that carries
    no load (k = 1 matrices, no tokens) gives uniform loads, so no bound ever binds."""
    num_experts = layer.num_experts
    if layer.sets_UK is not None:
        load_E = np.bincount(layer.sets_UK.ravel(), minlength=num_experts,
                             weights=np.repeat(layer.weight_U, layer.top_k)).astype(np.float64)
    elif layer.top_k > 1:
        load_E = layer.counts_EE.sum(axis=1) / (layer.top_k - 1)
    else:
        load_E = np.zeros(num_experts)
    return load_E if load_E.sum() > 0 else np.ones(num_experts)


def predicted_ranks_per_token(layer: LayerCollab, e2r_E: np.ndarray) -> float:
    """Distinct groups of ``e2r_E`` per token: exact on traces, estimated on matrices."""
    if layer.sets_UK is not None:
        return float(ranks_per_token_exact(layer.sets_UK, layer.weight_U, e2r_E))
    return ranks_per_token_estimate(layer.counts_EE, e2r_E, layer.top_k)


def _groups(e2r_E: np.ndarray, ep_size: int) -> list[list[int]]:
    return [np.flatnonzero(e2r_E == g).tolist() for g in range(ep_size)]


def assign_groups_to_ranks(e2r_E: np.ndarray, ep_size: int) -> list[list[int]]:
    """Groups (sorted ids) ordered so group g lands on the rank that already holds most of its
    experts (greedy max overlap with the identity placement): fewer experts move when applied."""
    num_experts = len(e2r_E)
    home_E = identity_placement(num_experts, ep_size)
    overlap_GP = np.zeros((ep_size, ep_size), dtype=np.int64)
    np.add.at(overlap_GP, (e2r_E, home_E), 1)
    rank_of_group = [-1] * ep_size
    for flat in np.argsort(-overlap_GP, axis=None, kind="stable").tolist():
        g, r = divmod(flat, ep_size)
        if rank_of_group[g] < 0 and r not in rank_of_group:
            rank_of_group[g] = r
    groups: list[list[int]] = [[] for _ in range(ep_size)]
    for e in range(num_experts):
        groups[rank_of_group[int(e2r_E[e])]].append(e)
    return groups


def _assigned(e2r_E: np.ndarray, ep_size: int) -> np.ndarray:
    groups = assign_groups_to_ranks(e2r_E, ep_size)
    return np.asarray(expert_to_rank_from_groups(groups, len(e2r_E)), dtype=np.int64)


# ------------------------------------------------------------------------------------------
# Flat placement (also the node level of a hierarchical plan, with ep_size = nodes)
# ------------------------------------------------------------------------------------------
def _place_unbounded(layer: LayerCollab, config: PlannerConfig, ep_size: int) -> np.ndarray:
    """The locality-only plan over ``ep_size`` groups, groups on the ranks holding most of
    their experts; the identity when it predicts no more groups per token."""
    num_experts = layer.num_experts
    identity_E = identity_placement(num_experts, ep_size)
    if ep_size == 1 or ep_size == num_experts:
        return identity_E  # every placement is equivalent
    if num_experts <= config.exact_max_experts:
        e2r_E = solve_exact(layer, ep_size)
    else:
        e2r_E = solve_heuristic(layer, dataclasses.replace(config, ep_size=ep_size, num_nodes=1))
    e2r_E = _assigned(e2r_E, ep_size)
    # The estimate can disagree with the pair objective: never predict worse than the identity.
    if predicted_ranks_per_token(layer, e2r_E) > predicted_ranks_per_token(layer, identity_E):
        return identity_E
    return e2r_E


def _place_bounded(layer: LayerCollab, config: PlannerConfig, ep_size: int, ratio: float,
                   unbounded_E: np.ndarray, load_E: np.ndarray) -> tuple[np.ndarray, float]:
    """The best-locality plan whose busiest group is <= ``ratio`` x the mean where achievable,
    else <= the smallest achievable. Returns (e2r_E, smallest achievable ratio)."""
    num_experts = layer.num_experts
    mean = load_E.sum() / ep_size
    identity_E = identity_placement(num_experts, ep_size)
    unbounded_ratio = float(busiest_over_mean(load_E, unbounded_E, ep_size))
    if ep_size == 1 or ep_size == num_experts:
        return unbounded_E, unbounded_ratio  # every placement has the same loads
    if num_experts <= config.exact_max_experts:
        best_E, smallest = solve_exact_capped(layer, np.arange(num_experts), ep_size,
                                              np.zeros(num_experts, np.int64), load_E, ratio, mean)
        starts = None
    else:
        balanced_E = balanced_by_load(load_E, ep_size)
        smallest = float(min(busiest_over_mean(load_E, np.stack([balanced_E, unbounded_E,
                                                                  identity_E]), ep_size)))
        cfg = dataclasses.replace(config, ep_size=ep_size, num_nodes=1)
        starts = [unbounded_E, identity_E, balanced_E, greedy_seed(layer.counts_EE, ep_size)]
        if config.restarts > 2:
            starts += list(random_placements(num_experts, ep_size, config.restarts - 2,
                                             config.seed))
    cap_P = np.full(ep_size, max(ratio, smallest) * mean)
    if fits_caps(load_E, unbounded_E, cap_P):
        return unbounded_E, min(smallest, unbounded_ratio)  # the bound does not bind
    if starts is not None:
        capped_E = solve_capped(layer, starts, ep_size, cfg, load_E=load_E, cap_P=cap_P)
        best_E = balanced_E if capped_E is None else capped_E  # balanced_E always fits
        smallest = min(smallest, float(busiest_over_mean(load_E, best_E, ep_size)))
    best_E = _assigned(best_E, ep_size)
    if (fits_caps(load_E, identity_E, cap_P) and predicted_ranks_per_token(layer, identity_E)
            < predicted_ranks_per_token(layer, best_E)):
        best_E = identity_E
    return best_E, smallest


# ------------------------------------------------------------------------------------------
# Rank level of a hierarchical plan: each node's experts over its G ranks
# ------------------------------------------------------------------------------------------
def _assign_within_nodes(e2r_E: np.ndarray, ep_size: int, per_node: int) -> np.ndarray:
    """Inside each node, rank groups moved to the node's ranks holding most of their experts."""
    home_E = identity_placement(len(e2r_E), ep_size)
    out_E = e2r_E.copy()
    for node in range(ep_size // per_node):
        first = node * per_node
        members = np.flatnonzero(e2r_E // per_node == node)
        local_E, home_local_E = e2r_E[members] - first, home_E[members] - first
        inside = (home_local_E >= 0) & (home_local_E < per_node)
        overlap = np.zeros((per_node, per_node), dtype=np.int64)
        np.add.at(overlap, (local_E[inside], home_local_E[inside]), 1)
        slot = [-1] * per_node
        for flat in np.argsort(-overlap, axis=None, kind="stable").tolist():
            g, r = divmod(flat, per_node)
            if slot[g] < 0 and r not in slot:
                slot[g] = r
        out_E[members] = first + np.asarray(slot)[local_E]
    return out_E


def _assign_hierarchical(e2r_E: np.ndarray, ep_size: int, per_node: int) -> np.ndarray:
    """Node groups to the nodes holding most of their experts, then rank groups likewise."""
    e2n_E = e2r_E // per_node
    num_nodes = ep_size // per_node
    node_of = np.empty(num_nodes, dtype=np.int64)
    for node, members in enumerate(assign_groups_to_ranks(e2n_E, num_nodes)):
        node_of[e2n_E[members[0]]] = node
    return _assign_within_nodes(node_of[e2n_E] * per_node + e2r_E % per_node, ep_size, per_node)


def _ranks_within_nodes(layer: LayerCollab, config: PlannerConfig, e2n_E: np.ndarray,
                        ratio: Optional[float], load_E: np.ndarray):
    """Heuristic ranks inside fixed nodes (swaps never cross nodes); under a bound each node's
    ranks are capped at max(ratio, the smallest busiest rank found for that node) x the mean.
    Returns (e2r_E, the largest of those smallest ratios, or None without a bound)."""
    num_experts, ep_size, num_nodes = layer.num_experts, config.ep_size, config.num_nodes
    per_node = ep_size // num_nodes  # G ranks per node
    size = num_experts // ep_size
    mean = load_E.sum() / ep_size
    members = [np.flatnonzero(e2n_E == n) for n in range(num_nodes)]
    base_E = np.empty(num_experts, dtype=np.int64)  # identity inside each node
    for n, m in enumerate(members):
        base_E[m] = n * per_node + np.arange(len(m)) // size
    if per_node == 1:
        e2r_E = base_E
        return e2r_E, None if ratio is None else float(busiest_over_mean(load_E, e2r_E, ep_size))
    allowed_EE = e2n_E[:, None] == e2n_E[None, :]
    rng = np.random.default_rng(config.seed)
    starts = [base_E, base_E.copy(), *[base_E.copy() for _ in range(config.restarts - 2)]]
    for n, m in enumerate(members):
        starts[1][m] = n * per_node + greedy_seed(layer.counts_EE[np.ix_(m, m)], per_node)
        for s in starts[2:]:
            s[m] = n * per_node + rng.permutation(np.arange(len(m)) // size)
    limits = [Limits(s, ep_size, allowed_EE=allowed_EE) for s in starts]
    refined = [refine_pairs(layer.counts_EE, s, ep_size, limits=lim)
               for s, lim in zip(starts, limits)]
    if layer.sets_UK is not None:
        pair_vals = [-float(within_group_pairs(layer.counts_EE, r)) for r in refined]
        refined += [refine_trace(layer, refined[i], ep_size, config,
                                 limits=Limits(refined[i], ep_size, allowed_EE=allowed_EE))
                    for i in np.argsort(pair_vals, kind="stable")[:2].tolist()]
    best_E = refined[int(np.argmin(objective_batch(layer, np.stack(refined))))]
    if ratio is None:
        return _assign_within_nodes(best_E, ep_size, per_node), None
    # Per node: the smallest busiest rank found (over the layer's mean rank load), and a cap
    # of max(ratio, that) x the mean for the node's ranks.
    balanced_E = base_E.copy()
    cap_P, worst = np.empty(ep_size), []
    for n, m in enumerate(members):
        balanced_E[m] = n * per_node + balanced_by_load(load_E[m], per_node)
        smallest_n = min(group_loads(load_E[m], s[m] - n * per_node, per_node).max() / mean
                         for s in (balanced_E, best_E, base_E))
        worst.append(float(smallest_n))
        cap_P[n * per_node:(n + 1) * per_node] = max(ratio, smallest_n) * mean
    if not fits_caps(load_E, best_E, cap_P):
        capped_E = solve_capped(layer, [best_E, balanced_E, *starts], ep_size, config,
                                load_E=load_E, cap_P=cap_P, allowed_EE=allowed_EE)
        best_E = balanced_E if capped_E is None else capped_E
    return _assign_within_nodes(best_E, ep_size, per_node), max(worst)


def _group_ranks_into_nodes(layer: LayerCollab, config: PlannerConfig, e2r_E: np.ndarray,
                           ratio: float, load_E: np.ndarray) -> np.ndarray:
    """Bottom-up: keep the ranks of ``e2r_E`` and put them into nodes (fewest nodes per token by
    the ranks' pair counts, node loads bounded). Node n gets ranks [n G, (n+1) G)."""
    num_experts, ep_size, num_nodes = layer.num_experts, config.ep_size, config.num_nodes
    per_node = ep_size // num_nodes
    onehot_EP = np.zeros((num_experts, ep_size))
    onehot_EP[np.arange(num_experts), e2r_E] = 1.0
    counts_PP = onehot_EP.T @ layer.counts_EE @ onehot_EP
    np.fill_diagonal(counts_PP, 0.0)
    ranks = LayerCollab(counts_EE=counts_PP, top_k=max(1, min(layer.top_k, ep_size)))
    rank_load_P = load_E @ onehot_EP
    r2n_P, _ = _place_bounded(ranks, config, num_nodes, ratio,
                              _place_unbounded(ranks, config, num_nodes), rank_load_P)
    new_rank_P = np.empty(ep_size, dtype=np.int64)
    for n in range(num_nodes):
        new_rank_P[r2n_P == n] = n * per_node + np.arange(per_node)
    return _assign_within_nodes(new_rank_P[e2r_E], ep_size, per_node)


def _place(layer: LayerCollab, config: PlannerConfig, ratio: Optional[float],
           unbounded_E: np.ndarray, load_E: np.ndarray) -> tuple[np.ndarray, Optional[dict]]:
    """The plan at one bound: (e2r_E, the plan file's ``load_bound`` or None when unbounded).
    ``unbounded_E``: the unbounded top-level placement (ranks, or nodes when hierarchical).

    Hierarchical under a bound: nodes first, then ranks inside them (top-down). The node split
    can leave a node whose experts cannot be spread evenly over its ranks, so when top-down
    misses the rank bound a bottom-up plan competes (the bounded flat rank plan, its ranks
    grouped into nodes: node loads are then at most G x the rank cap). The winner has the least
    excess over the applied bounds at both levels, then the fewest nodes, then ranks, per token."""
    num_experts, ep_size, num_nodes = layer.num_experts, config.ep_size, config.num_nodes
    exact = num_experts <= config.exact_max_experts
    bound = None if ratio is None else {"max_load_imbalance": float(ratio), "smallest_exact": exact}
    if num_nodes > 1 and exact:
        e2r_E, smallest_rank, smallest_node = solve_exact_hierarchical(
            layer, ep_size, num_nodes, load_E, math.inf if ratio is None else ratio)
        if bound is not None:
            bound.update(smallest_rank=smallest_rank, smallest_node=smallest_node)
        return _assign_hierarchical(e2r_E, ep_size, ep_size // num_nodes), bound
    if ratio is None:
        if num_nodes == 1:
            return unbounded_E, None
        return _ranks_within_nodes(layer, config, unbounded_E, None, load_E)[0], None
    if num_nodes == 1:
        e2r_E, bound["smallest_rank"] = _place_bounded(layer, config, ep_size, ratio, unbounded_E,
                                                       load_E)
        return e2r_E, bound
    per_node = ep_size // num_nodes
    e2n_E, smallest_node = _place_bounded(layer, config, num_nodes, ratio, unbounded_E, load_E)
    top_down_E, smallest_within = _ranks_within_nodes(layer, config, e2n_E, ratio, load_E)
    balanced_E = balanced_by_load(load_E, ep_size)
    smallest_rank = min(smallest_within, float(busiest_over_mean(load_E, balanced_E, ep_size)))
    candidates = [top_down_E]
    top_down_rank = float(busiest_over_mean(load_E, top_down_E, ep_size))
    if top_down_rank > max(ratio, smallest_rank) * (1 + 1e-9):
        flat_E, smallest_flat = _place_bounded(layer, config, ep_size, ratio,
                                               _place_unbounded(layer, config, ep_size), load_E)
        smallest_rank = min(smallest_rank, smallest_flat)
        candidates.append(_group_ranks_into_nodes(layer, config, flat_E, ratio, load_E))
    cap_rank, cap_node = max(ratio, smallest_rank), max(ratio, smallest_node)

    def key(e2r_E):
        excess = (max(0.0, float(busiest_over_mean(load_E, e2r_E, ep_size)) - cap_rank)
                  + max(0.0, float(busiest_over_mean(load_E, e2r_E // per_node, num_nodes))
                        - cap_node))
        return (excess if excess > 1e-9 else 0.0,
                predicted_ranks_per_token(layer, e2r_E // per_node),
                predicted_ranks_per_token(layer, e2r_E))

    bound.update(smallest_rank=smallest_rank, smallest_node=smallest_node)
    return min(candidates, key=key), bound


# ------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------
def _plan_layer_bounds(layer: LayerCollab, config: PlannerConfig,
                       ratios: Sequence[Optional[float]], index: int = 0) -> list[PlanLayer]:
    """One PlanLayer per bound in ``ratios`` (None = no bound), sharing the unbounded search."""
    ep_size, num_experts, num_nodes = config.ep_size, layer.num_experts, config.num_nodes
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size}): "
            "pick --ep from the divisors of E"
        )
    per_node = ep_size // num_nodes
    load_E = expert_load_E(layer)
    top_groups = num_nodes if num_nodes > 1 else ep_size
    unbounded_E = _place_unbounded(layer, config, top_groups)
    identity_E = identity_placement(num_experts, ep_size)
    randoms = random_placements(num_experts, ep_size, config.random_samples, config.seed + 1)
    baselines = {"identity": identity_E[None], "random": randoms}
    out = []
    for ratio in ratios:
        e2r_E, bound = _place(layer, config, ratio, unbounded_E, load_E)
        placements = dict(baselines, planned=e2r_E[None])

        def mean_of(fn):
            return {k: float(np.mean([fn(e) for e in v])) for k, v in placements.items()}

        nodes = {}
        if num_nodes > 1:
            nodes = dict(
                predicted_nodes_per_token=mean_of(
                    lambda e: predicted_ranks_per_token(layer, e // per_node)),
                predicted_busiest_node_load=mean_of(
                    lambda e: busiest_over_mean(load_E, e // per_node, num_nodes)))
        out.append(PlanLayer.from_groups(
            index, _groups(e2r_E, ep_size),
            mean_of(lambda e: predicted_ranks_per_token(layer, e)),
            exact=layer.sets_UK is not None,
            predicted_busiest_rank_load=mean_of(lambda e: busiest_over_mean(load_E, e, ep_size)),
            load_bound=bound, **nodes,
        ))
    return out


def plan_layer(layer: LayerCollab, config: PlannerConfig, index: int = 0) -> PlanLayer:
    """Plan one layer (plan layer ``index``) at ``config.max_load_imbalance``: search, rank
    assignment, predictions for identity / random / planned. No top-T lists (``make_plan``)."""
    return _plan_layer_bounds(layer, config, [config.max_load_imbalance], index)[0]


def plan_layers(
    layers: list[LayerCollab], config: PlannerConfig, progress: bool = True
) -> list[PlanLayer]:
    """Plan every layer (tqdm progress bar when ``progress``); plan layer i = ``layers[i]``."""
    return plan_with_tradeoff(layers, config, progress=progress)[0].layers


def plan_with_tradeoff(layers: list[LayerCollab], config: PlannerConfig, *,
                       bounds: Sequence[Optional[float]] = (), top_t: Optional[int] = None,
                       progress: bool = True) -> tuple[Plan, dict]:
    """``make_plan``'s plan at ``config.max_load_imbalance``, and ``{bound: [PlanLayer per
    layer]}`` for every bound in ``bounds`` (None = off): the locality/balance trade-off."""
    from tqdm import tqdm  # optional progress bar, imported only when planning

    if not layers:
        raise ValueError("no MoE layers in the collaboration source: nothing to plan")
    num_experts, top_k = layers[0].num_experts, layers[0].top_k
    if any(layer.num_experts != num_experts or layer.top_k != top_k for layer in layers):
        raise ValueError("collaboration layers differ in num_experts or top_k: plan them "
                         "separately")
    if num_experts % config.ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by --ep "
                         f"({config.ep_size}): pick P from the divisors of E")
    if top_t is not None and not 0 <= top_t <= num_experts - 1:
        raise ValueError(f"--top-t {top_t} must be in [0, num_experts-1={num_experts - 1}]")
    ratios = [config.max_load_imbalance] + [b for b in bounds if b != config.max_load_imbalance]
    per_ratio: dict = {r: [] for r in ratios}
    for i, layer in enumerate(tqdm(layers, desc="planning layers", unit="layer",
                                   disable=not progress)):
        for r, p in zip(ratios, _plan_layer_bounds(layer, config, ratios, index=i)):
            per_ratio[r].append(p)
    planned = per_ratio[config.max_load_imbalance]
    if top_t is not None:
        import torch  # the lists come from the tracker's torch implementation

        from megatron_c2r.collaboration import top_t_lists

        planned = [
            dataclasses.replace(
                p, top_t_lists=top_t_lists(torch.from_numpy(layer.counts_EE), top_t).tolist())
            for p, layer in zip(planned, layers)
        ]
    plan = Plan(num_experts=num_experts, ep_size=config.ep_size, top_k=top_k, layers=planned,
                num_nodes=config.num_nodes if config.num_nodes > 1 else None)
    return plan, {b: per_ratio[b] for b in bounds}


def make_plan(layers: list[LayerCollab], config: PlannerConfig, *, top_t: Optional[int] = None,
              progress: bool = True) -> Plan:
    """The plan file's content for ``layers`` (all with the same E and top-k): every layer
    planned, and with ``top_t`` each also carries the C2R paper's top-T lists from its counts
    (``collaboration.top_t_lists``). One-line ValueError for inconsistent layers or a bad T."""
    return plan_with_tradeoff(layers, config, top_t=top_t, progress=progress)[0]
