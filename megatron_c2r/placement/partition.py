"""Balanced-partition search: E experts into P groups of N = E/P, optionally under a load cap.

Pure numpy on CPU, off the hot path; ``planner.py`` decides what to search and reports it.
Shape suffixes (the legend in ``megatron_c2r/placement/__init__.py``): E experts, P groups
(EP ranks, or nodes at the node level of a hierarchical plan), N = E/P, K top-k, U distinct
top-k sets of a trace, C candidate placements evaluated together, M experts of one node.
    counts_EE   float64, symmetric, zero diagonal: raw co-activation counts C[i, j]
    sets_UK     int64: distinct top-k expert sets (one row per set), weight_U their token counts
    load_E      float64 >= 0: expected tokens per expert (``planner.expert_load_E``)
    e2r_E       int64: the placement; group g = the experts with e2r_E == g
    cap_P       float64: the most load group g may hold (absolute tokens, not a ratio)
    allowed_EE  bool: which pairs may swap (same node, for the rank level of a hierarchy)

Objectives:
    within_group_pairs       sum of C[i, j] over pairs in one group: the objective for plain
                             matrices (each such pair is one row a per-rank dedup communicator
                             does not ship when a token has <= 2 experts per rank).
    ranks_per_token_exact    mean distinct groups per token of a trace: the quantity itself, the
                             objective whenever full top-k sets are known.
    ranks_per_token_estimate the same from pair counts only (see its docstring), for reports.
    group_loads, busiest_over_mean   expected tokens per group; the busiest group over the mean
                             is what an EP step waits for.

Search (the exhaustive one for small E is ``exhaustive.py``): greedy seeding plus
best-improvement pairwise swaps (Kernighan-Lin style, vectorised over all E^2 pairs). Under a
cap, a start that breaks it is first repaired (swaps that remove the most excess load per unit
of locality lost), then refined with swaps that keep every group under its cap. Deterministic.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


# ------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------
def identity_placement(num_experts: int, ep_size: int) -> np.ndarray:
    """int64 [E]: Megatron's default, expert e on rank e // (E/P)."""
    return np.arange(num_experts, dtype=np.int64) // (num_experts // ep_size)


def within_group_pairs(counts_EE: np.ndarray, e2r_CE: np.ndarray) -> np.ndarray:
    """Sum of C[i, j] over unordered pairs on the same rank. e2r [E] -> scalar, [C, E] -> [C]."""
    same_CEE = e2r_CE[..., :, None] == e2r_CE[..., None, :]
    return (same_CEE * counts_EE).sum(axis=(-1, -2)) / 2.0


def ranks_per_token_exact(
    sets_UK: np.ndarray, weight_U: np.ndarray, e2r_CE: np.ndarray
) -> np.ndarray:
    """Token-weighted mean of distinct ranks per top-k set. e2r [E] -> scalar, [C, E] -> [C]."""
    if int(e2r_CE.max()) < 63 and hasattr(np, "bitwise_count"):
        # One bit per rank, OR over the set, popcount: ~5x faster than sorting.
        bits_CUK = np.left_shift(np.int64(1), e2r_CE[..., sets_UK])
        distinct_CU = np.bitwise_count(np.bitwise_or.reduce(bits_CUK, axis=-1))
    else:
        ranks_CUK = np.sort(e2r_CE[..., sets_UK], axis=-1)
        distinct_CU = 1 + (np.diff(ranks_CUK, axis=-1) != 0).sum(axis=-1)
    return (distinct_CU * weight_U).sum(axis=-1) / weight_U.sum()


def ranks_per_token_estimate(counts_EE: np.ndarray, e2r_E: np.ndarray, top_k: int) -> float:
    """Expected distinct ranks per token from pair counts only (tokens with exactly k experts).

    Per token, n_g = number of its experts on rank g; ranks = sum_g P(n_g >= 1). Pair counts give
    two moments per rank: mu_g = E[n_g] (loads: each of expert i's tokens has k-1 partners, so
    load_i = rowsum_i / (k-1), tokens N = sum(load)/k) and E[n_g(n_g-1)] = 2 * (pairs in g) / N.
    P(n_g = 0) is taken from the binomial / Poisson / negative-binomial family with those two
    moments, which share one closed form with rho = E[n(n-1)] / mu^2:
        P0 = (1 - mu (1 - rho)) ** (1 / (1 - rho))      (rho -> 1: exp(-mu))
    Uniform routing (hypergeometric ~ binomial): within 0.1% at E=256, 1% at E=16; within a few
    % on clustered routing (tests compare it with exact counts).
    """
    if top_k <= 1:
        return 1.0
    load_E = counts_EE.sum(axis=1) / (top_k - 1)
    num_tokens = load_E.sum() / top_k
    if num_tokens <= 0:
        return float(min(top_k, int(e2r_E.max()) + 1))
    ep_size = int(e2r_E.max()) + 1
    onehot_EP = np.zeros((len(e2r_E), ep_size))
    onehot_EP[np.arange(len(e2r_E)), e2r_E] = 1.0
    mu_P = (load_E @ onehot_EP) / num_tokens
    pairs2_P = np.einsum("ep,ef,fp->p", onehot_EP, counts_EE, onehot_EP) / num_tokens  # E[n(n-1)]
    total = 0.0
    for mu, m2 in zip(mu_P, pairs2_P):
        if mu <= 0:
            continue
        rho = m2 / (mu * mu)
        if abs(1.0 - rho) < 1e-9:
            p0 = np.exp(-mu)
        else:
            base = max(1.0 - mu * (1.0 - rho), 0.0)
            p0 = base ** (1.0 / (1.0 - rho))
        total += 1.0 - p0
    return float(total)


def random_placements(num_experts: int, ep_size: int, samples: int, seed: int) -> np.ndarray:
    """int64 [samples, E]: uniformly random balanced placements."""
    rng = np.random.default_rng(seed)
    base_E = identity_placement(num_experts, ep_size)
    return np.stack([rng.permutation(base_E) for _ in range(samples)])


def group_loads(load_E: np.ndarray, e2r_CE: np.ndarray, num_groups: int) -> np.ndarray:
    """float64 expected tokens per group: e2r [E] -> [P], [C, E] -> [C, P]."""
    e2r_CE2 = np.atleast_2d(e2r_CE)
    cand = e2r_CE2.shape[0]
    flat = (np.arange(cand)[:, None] * num_groups + e2r_CE2).ravel()
    loads = np.bincount(flat, weights=np.tile(load_E, cand), minlength=cand * num_groups)
    loads_CP = loads.reshape(cand, num_groups)
    return loads_CP[0] if np.ndim(e2r_CE) == 1 else loads_CP


def busiest_over_mean(load_E: np.ndarray, e2r_CE: np.ndarray, num_groups: int) -> np.ndarray:
    """The busiest group's load over the mean group load (1 = perfectly balanced).
    e2r [E] -> scalar, [C, E] -> [C]."""
    mean = load_E.sum() / num_groups
    return group_loads(load_E, e2r_CE, num_groups).max(axis=-1) / mean


def objective_batch(layer, e2r_CE: np.ndarray) -> np.ndarray:
    """Lower is better: distinct ranks (traces) or minus within-group pairs (matrices)."""
    if layer.sets_UK is not None:
        return ranks_per_token_exact(layer.sets_UK, layer.weight_U, e2r_CE)
    return -within_group_pairs(layer.counts_EE, e2r_CE)


# ------------------------------------------------------------------------------------------
# Heuristic search
# ------------------------------------------------------------------------------------------
def greedy_seed(counts_EE: np.ndarray, ep_size: int) -> np.ndarray:
    """Grow one group at a time from the busiest free expert, adding its strongest free partner."""
    num_experts = counts_EE.shape[0]
    size = num_experts // ep_size
    e2r_E = np.full(num_experts, -1, dtype=np.int64)
    load_E = counts_EE.sum(axis=1)
    for group in range(ep_size):
        free = e2r_E < 0
        seed = int(np.argmax(np.where(free, load_E, -np.inf)))
        e2r_E[seed] = group
        affinity_E = counts_EE[seed].copy()
        for _ in range(size - 1):
            pick = int(np.argmax(np.where(e2r_E < 0, affinity_E, -np.inf)))
            e2r_E[pick] = group
            affinity_E += counts_EE[pick]
    return e2r_E


def balanced_by_load(load_E: np.ndarray, num_groups: int, max_rounds: int = 100_000):
    """int64 [E]: a placement that minimises the busiest group's load (ignoring locality).

    Longest-processing-time first (heaviest expert to the lightest group with room), then
    swaps between the busiest group and any other that lower the busiest of the two; each swap
    lowers the loads sorted in decreasing order lexicographically, so it terminates."""
    num_experts = len(load_E)
    size = num_experts // num_groups
    e2r_E = np.empty(num_experts, dtype=np.int64)
    loads_P, fill_P = np.zeros(num_groups), np.zeros(num_groups, dtype=np.int64)
    for e in np.argsort(-load_E, kind="stable").tolist():
        g = int(np.argmin(np.where(fill_P < size, loads_P, np.inf)))
        e2r_E[e], loads_P[g], fill_P[g] = g, loads_P[g] + load_E[e], fill_P[g] + 1
    tol = 1e-12 * max(1.0, float(load_E.sum()))
    for _ in range(max_rounds):
        h = int(np.argmax(loads_P))
        inside, outside = np.flatnonzero(e2r_E == h), np.flatnonzero(e2r_E != h)
        if len(outside) == 0:
            break
        d_AB = load_E[inside][:, None] - load_E[outside][None, :]  # load moved out of h
        worst_AB = np.maximum(loads_P[h] - d_AB, loads_P[e2r_E[outside]][None, :] + d_AB)
        flat = int(np.argmin(worst_AB))
        a, b = divmod(flat, len(outside))
        if not worst_AB[a, b] < loads_P[h] - tol:
            break
        ea, eb = inside[a], outside[b]
        g = e2r_E[eb]
        loads_P[h] -= d_AB[a, b]
        loads_P[g] += d_AB[a, b]
        e2r_E[ea], e2r_E[eb] = g, h
    return e2r_E


class _SwapState:
    """Pairwise-swap bookkeeping for the pair objective. S[i, g] = sum of C[i, j] over j on g;
    base[a, b] = -2 C[a, b], or -inf when a and b share a rank (kept up to date on swaps)."""

    def __init__(self, counts_EE: np.ndarray, e2r_E: np.ndarray, ep_size: int):
        self.c_EE = counts_EE
        self.e2r_E = e2r_E.copy()
        onehot_EP = np.zeros((len(e2r_E), ep_size))
        onehot_EP[np.arange(len(e2r_E)), e2r_E] = 1.0
        self.s_EP = counts_EE @ onehot_EP
        self.arange_E = np.arange(len(e2r_E))
        same_EE = self.e2r_E[:, None] == self.e2r_E[None, :]
        self.base_EE = np.where(same_EE, -np.inf, -2.0 * counts_EE)

    def gains_EE(self) -> np.ndarray:
        """Gain in within-group pairs of swapping a and b: D[a, g(b)] + D[b, g(a)] - 2 C[a, b],
        D[a, h] = S[a, h] - S[a, g(a)]; -inf for pairs already on one rank."""
        d_EP = self.s_EP - self.s_EP[self.arange_E, self.e2r_E][:, None]
        dg_EE = d_EP[:, self.e2r_E]
        gain_EE = dg_EE + dg_EE.T
        gain_EE += self.base_EE
        return gain_EE

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.e2r_E[a], self.e2r_E[b]
        delta_E = self.c_EE[:, b] - self.c_EE[:, a]
        self.s_EP[:, ra] += delta_E
        self.s_EP[:, rb] -= delta_E
        self.e2r_E[a], self.e2r_E[b] = rb, ra
        for x in (a, b):
            row_E = np.where(self.e2r_E == self.e2r_E[x], -np.inf, -2.0 * self.c_EE[x])
            self.base_EE[x, :] = row_E
            self.base_EE[:, x] = row_E


class Limits:
    """What a swap must respect: per-group load caps and/or which pairs may swap at all.

    ``loads_P`` follows the placement it is created for (``moved`` after each swap)."""

    def __init__(self, e2r_E, num_groups: int, load_E=None, cap_P=None, allowed_EE=None):
        self.load_E, self.cap_P, self.allowed_EE = load_E, cap_P, allowed_EE
        self.loads_P = None if load_E is None else group_loads(load_E, e2r_E, num_groups)
        self.tol = 0.0 if load_E is None else 1e-9 * max(1.0, float(load_E.sum()) / num_groups)

    def mask_(self, gain_EE: np.ndarray, e2r_E: np.ndarray) -> np.ndarray:
        """Set -inf where a swap would put a group over its cap or swaps across nodes."""
        if self.allowed_EE is not None:
            gain_EE[~self.allowed_EE] = -np.inf
        if self.cap_P is not None:
            d_EE = self.load_E[None, :] - self.load_E[:, None]  # into a's group when a <-> b
            room_E = self.cap_P[e2r_E] - self.loads_P[e2r_E] + self.tol
            gain_EE[(d_EE > room_E[:, None]) | (-d_EE > room_E[None, :])] = -np.inf
        return gain_EE

    def fits(self, a: int, b: int, ra: int, rb: int) -> bool:
        if self.allowed_EE is not None and not self.allowed_EE[a, b]:
            return False
        if self.cap_P is None:
            return True
        d = self.load_E[b] - self.load_E[a]
        return (self.loads_P[ra] + d <= self.cap_P[ra] + self.tol
                and self.loads_P[rb] - d <= self.cap_P[rb] + self.tol)

    def moved(self, a: int, b: int, ra: int, rb: int) -> None:
        if self.loads_P is not None:
            d = self.load_E[b] - self.load_E[a]
            self.loads_P[ra] += d
            self.loads_P[rb] -= d


def refine_pairs(counts_EE: np.ndarray, e2r_E: np.ndarray, ep_size: int, max_rounds: int = 4096,
                 limits: Optional[Limits] = None):
    """Best-improvement pairwise swaps until no swap gains within-group pairs (among the swaps
    ``limits`` allows, when given; the start must respect its caps).

    Each round applies the best swap, then the best swap between two other ranks, and so on:
    a swap's gain (and its effect on loads) only depends on its own two ranks, so swaps on
    disjoint rank pairs are independent and up to P/2 of them share one O(E^2) computation."""
    state = _SwapState(counts_EE, e2r_E, ep_size)
    tol = 1e-12 * max(1.0, float(counts_EE.sum()))
    for _ in range(max_rounds):
        gain_EE = state.gains_EE()
        if limits is not None:
            limits.mask_(gain_EE, state.e2r_E)
        swapped = False
        while True:
            flat = int(np.argmax(gain_EE))
            a, b = divmod(flat, gain_EE.shape[1])
            if not gain_EE[a, b] > tol:
                break
            busy_E = (state.e2r_E == state.e2r_E[a]) | (state.e2r_E == state.e2r_E[b])
            gain_EE[busy_E, :] = -np.inf
            gain_EE[:, busy_E] = -np.inf
            if limits is not None:
                limits.moved(a, b, int(state.e2r_E[a]), int(state.e2r_E[b]))
            state.swap(a, b)
            swapped = True
        if not swapped:
            break
    return state.e2r_E


def repair_to_caps(counts_EE: np.ndarray, e2r_E: np.ndarray, ep_size: int, limits: Limits,
                   max_rounds: int = 100_000) -> np.ndarray:
    """Swaps until every group is within its cap (or no allowed swap lowers the excess):
    each step takes the swap that removes the most excess load, sum_g max(0, load_g - cap_g),
    per unit of within-group pairs lost (gaining pairs first). The result may still break a cap:
    callers check ``fits_caps``."""
    state = _SwapState(counts_EE, e2r_E, ep_size)
    load_E, cap_P = limits.load_E, limits.cap_P
    for _ in range(max_rounds):
        loads_P = limits.loads_P
        over_P = np.maximum(loads_P - cap_P, 0.0)
        if over_P.sum() <= limits.tol:
            break
        e2r = state.e2r_E
        d_EE = load_E[None, :] - load_E[:, None]  # into a's group when a <-> b
        new_a = np.maximum(loads_P[e2r][:, None] + d_EE - cap_P[e2r][:, None], 0.0)
        new_b = np.maximum(loads_P[e2r][None, :] - d_EE - cap_P[e2r][None, :], 0.0)
        cut_EE = over_P[e2r][:, None] + over_P[e2r][None, :] - new_a - new_b
        cut_EE[e2r[:, None] == e2r[None, :]] = 0.0
        if limits.allowed_EE is not None:
            cut_EE[~limits.allowed_EE] = 0.0
        useful_EE = cut_EE > limits.tol
        if not useful_EE.any():
            break
        gain_EE = state.gains_EE()
        # Loss per unit of excess removed; a swap that gains pairs ranks above any that loses.
        score_EE = np.where(useful_EE, gain_EE / np.where(useful_EE, cut_EE, 1.0), -np.inf)
        a, b = divmod(int(np.argmax(score_EE)), score_EE.shape[1])
        limits.moved(a, b, int(e2r[a]), int(e2r[b]))
        state.swap(a, b)
    return state.e2r_E


def fits_caps(load_E: np.ndarray, e2r_E: np.ndarray, cap_P: np.ndarray) -> bool:
    """Every group's load <= its cap (relative tolerance 1e-9 of the mean)."""
    tol = 1e-9 * max(1.0, float(load_E.sum()) / len(cap_P))
    return bool((group_loads(load_E, e2r_E, len(cap_P)) <= cap_P + tol).all())


class _TraceState:
    """Per-set rank counts N[u, g] for exact swap deltas on traces."""

    def __init__(self, sets_UK: np.ndarray, weight_U: np.ndarray, e2r_E: np.ndarray, ep_size):
        self.sets_UK, self.w_U = sets_UK, weight_U
        num_sets, top_k = sets_UK.shape
        cell = (np.arange(num_sets)[:, None] * ep_size + e2r_E[sets_UK]).ravel()
        self.n_UP = np.bincount(cell, minlength=num_sets * ep_size).astype(np.int32)
        self.n_UP = self.n_UP.reshape(num_sets, ep_size)
        flat = sets_UK.ravel()
        by_expert = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[by_expert], np.arange(len(e2r_E) + 1))
        sets_of = by_expert // top_k
        self.sets_of_expert = [sets_of[starts[e] : starts[e + 1]] for e in range(len(e2r_E))]

    def _split(self, a: int, b: int):
        u_a, u_b = self.sets_of_expert[a], self.sets_of_expert[b]
        only_a = u_a[~(self.sets_UK[u_a] == b).any(axis=1)]
        only_b = u_b[~(self.sets_UK[u_b] == a).any(axis=1)]
        return only_a, only_b

    def delta(self, a: int, b: int, ra: int, rb: int) -> float:
        """Change of the weighted distinct-rank total if a (on ra) and b (on rb) swap."""
        only_a, only_b = self._split(a, b)
        n = self.n_UP
        d_a = (n[only_a, rb] == 0).astype(np.int64) - (n[only_a, ra] == 1)
        d_b = (n[only_b, ra] == 0).astype(np.int64) - (n[only_b, rb] == 1)
        return float((self.w_U[only_a] * d_a).sum() + (self.w_U[only_b] * d_b).sum())

    def swap(self, a: int, b: int, ra: int, rb: int) -> None:
        only_a, only_b = self._split(a, b)
        self.n_UP[only_a, ra] -= 1
        self.n_UP[only_a, rb] += 1
        self.n_UP[only_b, rb] -= 1
        self.n_UP[only_b, ra] += 1


def refine_trace(layer, e2r_E: np.ndarray, ep_size: int, config,
                 limits: Optional[Limits] = None):
    """Swaps judged by the exact distinct-ranks objective; candidates ranked by the pair gain
    (only swaps ``limits`` allows, when given). ``config``: trace_passes, swap_candidates."""
    pairs = _SwapState(layer.counts_EE, e2r_E, ep_size)
    trace = _TraceState(layer.sets_UK, layer.weight_U, pairs.e2r_E, ep_size)
    tol = 1e-9 * float(layer.weight_U.sum())
    for _ in range(config.trace_passes):
        gain_EE = np.triu(pairs.gains_EE(), 1)
        gain_EE[np.tril_indices_from(gain_EE)] = -np.inf
        if limits is not None and limits.allowed_EE is not None:
            gain_EE[~limits.allowed_EE] = -np.inf
        top = np.argsort(-gain_EE, axis=None, kind="stable")[: config.swap_candidates]
        improved, touched = False, set()
        for flat in top.tolist():
            a, b = divmod(flat, gain_EE.shape[1])
            if not np.isfinite(gain_EE[a, b]) or a in touched or b in touched:
                continue
            ra, rb = int(pairs.e2r_E[a]), int(pairs.e2r_E[b])
            if limits is not None and not limits.fits(a, b, ra, rb):
                continue
            if trace.delta(a, b, ra, rb) < -tol:
                trace.swap(a, b, ra, rb)
                pairs.swap(a, b)
                if limits is not None:
                    limits.moved(a, b, ra, rb)
                touched.update((a, b))
                improved = True
        if not improved:
            break
    return pairs.e2r_E


def solve_heuristic(layer, config) -> np.ndarray:
    """Best of: greedy seed, identity, random starts; each refined by pair swaps (and by exact
    swaps on traces). The identity is always a start, so the result is never worse than it.
    ``config``: ep_size, restarts, seed (and the trace knobs of ``refine_trace``)."""
    ep_size, num_experts = config.ep_size, layer.num_experts
    starts = [greedy_seed(layer.counts_EE, ep_size), identity_placement(num_experts, ep_size)]
    if config.restarts > 2:
        starts += list(random_placements(num_experts, ep_size, config.restarts - 2, config.seed))
    refined = [refine_pairs(layer.counts_EE, s, ep_size) for s in starts]
    if layer.sets_UK is not None:
        pair_vals = [-float(within_group_pairs(layer.counts_EE, r)) for r in refined]
        best_two = np.argsort(pair_vals, kind="stable")[:2].tolist()
        refined = [refine_trace(layer, refined[i], ep_size, config) for i in best_two]
        refined.append(identity_placement(num_experts, ep_size))
    vals = objective_batch(layer, np.stack(refined))
    return refined[int(np.argmin(vals))]


def solve_capped(layer, starts: list, ep_size: int, config, *, load_E, cap_P,
                 allowed_EE=None) -> Optional[np.ndarray]:
    """Best placement under per-group caps found from ``starts`` (None if none could be made
    to fit): each start is repaired to the caps if needed, refined with cap-keeping pair swaps,
    and on traces the best two by pairs get cap-keeping exact swaps. A start that already fits
    only improves, so the result is never worse than the best fitting start."""
    def limits_for(e2r):
        return Limits(e2r, ep_size, load_E=load_E, cap_P=cap_P, allowed_EE=allowed_EE)

    refined = []
    for start in starts:
        e2r = start if fits_caps(load_E, start, cap_P) else repair_to_caps(
            layer.counts_EE, start, ep_size, limits_for(start))
        if fits_caps(load_E, e2r, cap_P):
            refined.append(refine_pairs(layer.counts_EE, e2r, ep_size, limits=limits_for(e2r)))
    if not refined:
        return None
    if layer.sets_UK is not None:
        pair_vals = [-float(within_group_pairs(layer.counts_EE, r)) for r in refined]
        best_two = np.argsort(pair_vals, kind="stable")[:2].tolist()
        refined += [refine_trace(layer, refined[i], ep_size, config, limits=limits_for(refined[i]))
                    for i in best_two]
    vals = objective_batch(layer, np.stack(refined))
    return refined[int(np.argmin(vals))]
