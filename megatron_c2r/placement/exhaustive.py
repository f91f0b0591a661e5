"""Exhaustive search over balanced partitions, for small E (``PlannerConfig.exact_max_experts``).

Pure numpy on CPU. Shape suffixes as in ``partition.py``; Q groupings of P rank groups into
nodes. E=12 over 4 ranks: 15,400 partitions; over 4 ranks in 2 nodes: 15,400 x 3 placements.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np

from megatron_c2r.placement.partition import group_loads, objective_batch


def balanced_partitions(num_experts: int, ep_size: int) -> Iterator[np.ndarray]:
    """Every partition of range(E) into P unlabelled groups of E/P, as e2r [E] (group ids in
    order of each group's smallest expert). E=12, P=4: 15,400 partitions."""
    size = num_experts // ep_size
    e2r_E = np.full(num_experts, -1, dtype=np.int64)

    def rec(group: int) -> Iterator[np.ndarray]:
        free = np.flatnonzero(e2r_E < 0)
        if len(free) == 0:
            yield e2r_E.copy()
            return
        first, rest = free[0], free[1:]
        for others in itertools.combinations(rest.tolist(), size - 1):
            members = [first, *others]
            e2r_E[members] = group
            yield from rec(group + 1)
            e2r_E[members] = -1

    yield from rec(0)


def solve_exact(layer, ep_size: int, chunk: int = 2048) -> np.ndarray:
    """The optimal placement by exhaustive enumeration (first optimum in enumeration order)."""
    best_val, best_E = np.inf, None
    gen = balanced_partitions(layer.num_experts, ep_size)
    while True:
        batch = list(itertools.islice(gen, chunk))
        if not batch:
            break
        vals_C = objective_batch(layer, np.stack(batch))
        i = int(np.argmin(vals_C))
        if best_E is None or vals_C[i] < best_val - 1e-9 * max(1.0, abs(best_val)):
            best_val, best_E = vals_C[i], batch[i]
    return best_E


def solve_exact_capped(layer, members_M: np.ndarray, num_groups: int, base_E: np.ndarray,
                       load_E: np.ndarray, ratio: float, mean: float, chunk: int = 2048):
    """Exhaustive search over the partitions of ``members_M`` into ``num_groups`` groups (group
    ids ``base_E[members]``'s block: min(base_E[members]) + local id); every other expert keeps
    ``base_E``. Among partitions whose busiest group is <= ``ratio`` x ``mean``, or, when none
    is, the least imbalanced ones, the best objective (first in enumeration order).

    Returns (e2r_E, smallest): the placement and the smallest busiest-group load / ``mean``
    any partition of the members achieves."""
    offset = int(base_E[members_M].min())
    vals, worst, parts = [], [], []
    gen = balanced_partitions(len(members_M), num_groups)
    while True:
        batch = list(itertools.islice(gen, chunk))
        if not batch:
            break
        local_CM = np.stack(batch)
        e2r_CE = np.repeat(base_E[None, :], len(batch), axis=0)
        e2r_CE[:, members_M] = offset + local_CM
        vals.append(objective_batch(layer, e2r_CE))
        worst.append(group_loads(load_E[members_M], local_CM, num_groups).max(axis=1) / mean)
        parts.append(e2r_CE)
    vals_C, worst_C, parts_CE = np.concatenate(vals), np.concatenate(worst), np.concatenate(parts)
    smallest = float(worst_C.min())
    ok_C = worst_C <= max(ratio, smallest) * (1 + 1e-9)
    best = np.flatnonzero(ok_C)[int(np.argmin(vals_C[ok_C]))]
    return parts_CE[best], smallest


def solve_exact_hierarchical(layer, ep_size: int, num_nodes: int, load_E: np.ndarray,
                             ratio: float, budget: int = 1 << 24):
    """Every placement of E experts on P ranks in N nodes of G = P/N consecutive ranks: rank
    partitions x groupings of the P rank groups into nodes. Picks, in order: the least excess
    over the applied bounds (max(ratio, the smallest busiest/mean any placement achieves), at
    the rank and at the node level), the fewest nodes per token, the fewest ranks per token
    (objectives of ``partition.objective_batch``; ties to the first in enumeration order).

    Returns (e2r_E node-major: node n = ranks [n G, (n+1) G), smallest rank ratio, smallest
    node ratio)."""
    num_experts = layer.num_experts
    per_node = ep_size // num_nodes
    parts_CE = np.stack(list(balanced_partitions(num_experts, ep_size)))
    g2n_QP = np.stack(list(balanced_partitions(ep_size, num_nodes)))
    # Rank of group p: its node's first rank + how many groups of that node come before it.
    before_QP = (np.cumsum(g2n_QP[:, :, None] == np.arange(num_nodes), axis=1)
                 [np.arange(len(g2n_QP))[:, None], np.arange(ep_size)[None, :], g2n_QP] - 1)
    g2r_QP = g2n_QP * per_node + before_QP
    onehot_QPN = (g2n_QP[:, :, None] == np.arange(num_nodes)).astype(np.float64)
    loads_CP = group_loads(load_E, parts_CE, ep_size)
    rank_busy_C = loads_CP.max(axis=1) / (load_E.sum() / ep_size)
    node_busy_CQ = np.einsum("cp,qpn->cqn", loads_CP, onehot_QPN).max(axis=2) / (
        load_E.sum() / num_nodes)
    width = len(g2n_QP) * (1 if layer.sets_UK is None else layer.sets_UK.size)
    chunk = max(1, budget // (width * max(1, num_experts)))
    node_obj, rank_obj = [], []
    for start in range(0, len(parts_CE), chunk):
        part_CE = parts_CE[start:start + chunk]
        e2n_XE = g2n_QP[:, part_CE].transpose(1, 0, 2).reshape(-1, num_experts)  # X = (c, q)
        node_obj.append(objective_batch(layer, e2n_XE))
        rank_obj.append(objective_batch(layer, part_CE))
    node_obj_X = np.concatenate(node_obj)
    rank_obj_X = np.repeat(np.concatenate(rank_obj), len(g2n_QP))
    smallest_rank, smallest_node = float(rank_busy_C.min()), float(node_busy_CQ.min())
    excess_X = (np.maximum(np.repeat(rank_busy_C, len(g2n_QP)) - max(ratio, smallest_rank), 0)
                + np.maximum(node_busy_CQ.ravel() - max(ratio, smallest_node), 0))
    scale = max(1.0, float(np.abs(node_obj_X).max()), float(np.abs(rank_obj_X).max()))
    keys = [np.round(v / scale, 9) for v in (rank_obj_X, node_obj_X, np.where(
        excess_X > 1e-9, excess_X, 0.0))]
    best = int(np.lexsort(keys)[0])
    c, q = divmod(best, len(g2n_QP))
    return g2r_QP[q][parts_CE[c]], smallest_rank, smallest_node
