"""Balanced expert placement: partition E experts into P groups of N = E/P (group g = EP rank g).

Goal: few distinct destination ranks per token (= rows a per-rank dedup communicator ships).

Shape suffixes (the legend in ``megatron_c2r/placement/__init__.py``): E experts, P EP ranks,
N = E/P experts per rank, K top-k, U distinct top-k sets of a trace, C candidate placements
evaluated together, G planned groups before they are assigned to ranks.
    counts_EE   float64, symmetric, zero diagonal: raw co-activation counts C[i, j]
    sets_UK     int64: distinct top-k expert sets (one row per set), weight_U their token counts
    e2r_E       int64: expert_to_rank, the placement; group g = the experts with e2r_E == g

Objectives (all pure numpy, CPU):
    within_group_pairs       sum of C[i, j] over pairs on the same rank. The planner's objective for
                             plain matrices: each such pair is one row a dedup communicator does
                             not ship when a token has <= 2 experts per rank.
    ranks_per_token_exact    mean distinct ranks per token of a trace. The quantity itself; with
                             full top-k sets (traces, dumps) the planner optimises it directly.
    ranks_per_token_estimate an estimate from pair counts only (see its docstring); used to report
                             matrix sources. Matches uniform routing's closed form
                             P (1 - C(E - N, K) / C(E, K)) (docs/comm_volume.md).

Search: exhaustive over all balanced partitions when E <= ``exact_max_experts`` (12 gives at most
15,400 partitions); otherwise greedy seeding + best-improvement pairwise swaps (Kernighan-Lin
style, vectorised over all E^2 pairs) from several seeded starts, including the identity, so the
result is never worse than the identity in the optimised objective. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional

import numpy as np

from megatron_c2r.placement.plan_file import Plan, PlanLayer, expert_to_rank_from_groups
from megatron_c2r.placement.sources import LayerCollab


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    ep_size: int
    seed: int = 0
    # Starts for the heuristic: greedy and identity always, then (restarts - 2) random ones.
    # On synthetic clustered routing at E=256/P=8, 12 restarts moved planned ranks/token by
    # < 0.1% versus 4, and 4 keeps a layer under 0.5 s of CPU.
    restarts: int = 4
    # Exhaustive search up to this many experts (12 experts over 4 ranks: 15,400 partitions).
    exact_max_experts: int = 12
    # Random placements averaged for the "random" baseline.
    random_samples: int = 16
    # Exact-objective swap passes on traces (each pass tries the best `swap_candidates` by proxy).
    trace_passes: int = 200
    swap_candidates: int = 48

    def __post_init__(self):
        if self.ep_size < 1:
            raise ValueError(f"ep_size={self.ep_size} must be >= 1")
        if self.restarts < 1:
            raise ValueError(f"restarts={self.restarts} must be >= 1")


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


def predicted_ranks_per_token(layer: LayerCollab, e2r_E: np.ndarray) -> float:
    """Exact on traces, estimated on matrices."""
    if layer.sets_UK is not None:
        return float(ranks_per_token_exact(layer.sets_UK, layer.weight_U, e2r_E))
    return ranks_per_token_estimate(layer.counts_EE, e2r_E, layer.top_k)


def random_placements(num_experts: int, ep_size: int, samples: int, seed: int) -> np.ndarray:
    """int64 [samples, E]: uniformly random balanced placements."""
    rng = np.random.default_rng(seed)
    base_E = identity_placement(num_experts, ep_size)
    return np.stack([rng.permutation(base_E) for _ in range(samples)])


# ------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------
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


def _objective_batch(layer: LayerCollab, e2r_CE: np.ndarray) -> np.ndarray:
    """Lower is better: distinct ranks (traces) or minus within-group pairs (matrices)."""
    if layer.sets_UK is not None:
        return ranks_per_token_exact(layer.sets_UK, layer.weight_U, e2r_CE)
    return -within_group_pairs(layer.counts_EE, e2r_CE)


def solve_exact(layer: LayerCollab, ep_size: int, chunk: int = 2048) -> np.ndarray:
    """The optimal placement by exhaustive enumeration (first optimum in enumeration order)."""
    best_val, best_E = np.inf, None
    gen = balanced_partitions(layer.num_experts, ep_size)
    while True:
        batch = list(itertools.islice(gen, chunk))
        if not batch:
            break
        vals_C = _objective_batch(layer, np.stack(batch))
        i = int(np.argmin(vals_C))
        if best_E is None or vals_C[i] < best_val - 1e-9 * max(1.0, abs(best_val)):
            best_val, best_E = vals_C[i], batch[i]
    return best_E


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
        self.base_EE = np.where(self.e2r_E[:, None] == self.e2r_E[None, :], -np.inf, -2.0 * counts_EE)

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


def refine_pairs(counts_EE: np.ndarray, e2r_E: np.ndarray, ep_size: int, max_rounds: int = 4096):
    """Best-improvement pairwise swaps until no swap gains within-group pairs.

    Each round applies the best swap, then the best swap between two other ranks, and so on:
    a swap's gain only depends on its own two ranks, so swaps on disjoint rank pairs are
    independent and up to P/2 of them share one O(E^2) gain computation."""
    state = _SwapState(counts_EE, e2r_E, ep_size)
    tol = 1e-12 * max(1.0, float(counts_EE.sum()))
    for _ in range(max_rounds):
        gain_EE = state.gains_EE()
        swapped = False
        while True:
            flat = int(np.argmax(gain_EE))
            a, b = divmod(flat, gain_EE.shape[1])
            if not gain_EE[a, b] > tol:
                break
            busy_E = (state.e2r_E == state.e2r_E[a]) | (state.e2r_E == state.e2r_E[b])
            gain_EE[busy_E, :] = -np.inf
            gain_EE[:, busy_E] = -np.inf
            state.swap(a, b)
            swapped = True
        if not swapped:
            break
    return state.e2r_E


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


def refine_trace(layer: LayerCollab, e2r_E: np.ndarray, ep_size: int, config: PlannerConfig):
    """Swaps judged by the exact distinct-ranks objective; candidates ranked by the pair gain."""
    pairs = _SwapState(layer.counts_EE, e2r_E, ep_size)
    trace = _TraceState(layer.sets_UK, layer.weight_U, pairs.e2r_E, ep_size)
    tol = 1e-9 * float(layer.weight_U.sum())
    for _ in range(config.trace_passes):
        gain_EE = np.triu(pairs.gains_EE(), 1)
        gain_EE[np.tril_indices_from(gain_EE)] = -np.inf
        top = np.argsort(-gain_EE, axis=None, kind="stable")[: config.swap_candidates]
        improved, touched = False, set()
        for flat in top.tolist():
            a, b = divmod(flat, gain_EE.shape[1])
            if not np.isfinite(gain_EE[a, b]) or a in touched or b in touched:
                continue
            ra, rb = int(pairs.e2r_E[a]), int(pairs.e2r_E[b])
            if trace.delta(a, b, ra, rb) < -tol:
                trace.swap(a, b, ra, rb)
                pairs.swap(a, b)
                touched.update((a, b))
                improved = True
        if not improved:
            break
    return pairs.e2r_E


def solve_heuristic(layer: LayerCollab, config: PlannerConfig) -> np.ndarray:
    """Best of: greedy seed, identity, random starts; each refined by pair swaps (and by exact
    swaps on traces). The identity is always a start, so the result is never worse than it."""
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
    vals = _objective_batch(layer, np.stack(refined))
    return refined[int(np.argmin(vals))]


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


def plan_layer(layer: LayerCollab, config: PlannerConfig, index: int = 0) -> PlanLayer:
    """Plan one layer (plan layer ``index``): search, rank assignment, predicted ranks per
    token. The result has no top-T lists (``make_plan`` adds them)."""
    ep_size, num_experts = config.ep_size, layer.num_experts
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size}): "
            "pick --ep from the divisors of E"
        )
    identity_E = identity_placement(num_experts, ep_size)
    if ep_size == 1 or ep_size == num_experts:
        e2r_E = identity_E  # every placement is equivalent
    elif num_experts <= config.exact_max_experts:
        e2r_E = solve_exact(layer, ep_size)
    else:
        e2r_E = solve_heuristic(layer, config)
    groups = assign_groups_to_ranks(e2r_E, ep_size)
    e2r_E = np.asarray(expert_to_rank_from_groups(groups, num_experts), dtype=np.int64)
    ident = predicted_ranks_per_token(layer, identity_E)
    planned = predicted_ranks_per_token(layer, e2r_E)
    if planned > ident:  # the estimate can disagree with the pair objective: never report worse
        groups = [list(range(g * num_experts // ep_size, (g + 1) * num_experts // ep_size))
                  for g in range(ep_size)]
        e2r_E, planned = identity_E, ident
    randoms = random_placements(num_experts, ep_size, config.random_samples, config.seed + 1)
    rand = float(np.mean([predicted_ranks_per_token(layer, r) for r in randoms]))
    return PlanLayer.from_groups(
        index, groups, {"identity": ident, "random": rand, "planned": planned},
        exact=layer.sets_UK is not None,
    )


def plan_layers(
    layers: list[LayerCollab], config: PlannerConfig, progress: bool = True
) -> list[PlanLayer]:
    """Plan every layer (tqdm progress bar when ``progress``); plan layer i = ``layers[i]``."""
    from tqdm import tqdm  # optional progress bar, imported only when planning

    return [
        plan_layer(layer, config, index=i)
        for i, layer in enumerate(
            tqdm(layers, desc="planning layers", unit="layer", disable=not progress))
    ]


def make_plan(layers: list[LayerCollab], config: PlannerConfig, *, top_t: Optional[int] = None,
              progress: bool = True) -> Plan:
    """The plan file's content for ``layers`` (all with the same E and top-k): every layer
    planned, and with ``top_t`` each also carries the C2R paper's top-T lists from its counts
    (``collaboration.top_t_lists``). One-line ValueError for inconsistent layers or a bad T."""
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
    planned = plan_layers(layers, config, progress=progress)
    if top_t is not None:
        import torch  # the lists come from the tracker's torch implementation

        from megatron_c2r.collaboration import top_t_lists

        planned = [
            dataclasses.replace(
                p, top_t_lists=top_t_lists(torch.from_numpy(layer.counts_EE), top_t).tolist())
            for p, layer in zip(planned, layers)
        ]
    return Plan(num_experts=num_experts, ep_size=config.ep_size, top_k=top_k, layers=planned)
