"""Single-process oracles for every step of the de-duplicating communicator.

Each function here is written as plainly as possible (Python loops over tokens, ranks and experts)
so the vectorised functions in ``rows.py`` and the multi-process dispatcher can be tested against
something obviously right. Not for production use: they are O(T * E) Python.

Shape suffixes: see the legend in ``megatron_c2r/comm/__init__.py``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_c2r.comm import two_level
from megatron_c2r.comm.all_to_all import reference_all_to_all
from megatron_c2r.comm.rows import (
    build_send_rows,
    combine_rows,
    count_send_rows,
    expand_rows,
    precombine_rows,
)
from megatron_c2r.comm.topology import NodeTopology

# One row: (source token, destination block, [(expert id inside the block, prob), ...] in
# ascending id order). A block is an EP rank's experts (flat rows) or a node's (node rows).
Row = tuple[int, int, list[tuple[int, float]]]
# The simulators' inputs: one tensor per simulated rank, and all E experts as callables
# ``[n, H] -> [n, H]``.
PerRank = Sequence[torch.Tensor]
Experts = Sequence[Callable[[torch.Tensor], torch.Tensor]]


def _block_rows(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, num_blocks: int, order: Sequence[int]
) -> list[Row]:
    """For each block of E / ``num_blocks`` consecutive experts in ``order``, for each token
    (ascending) with at least one expert there, one row with those experts' ids inside the
    block and their probs."""
    T, E = routing_map_TE.shape
    K = E // num_blocks
    rows: list[Row] = []
    for block in order:
        for t in range(T):
            experts = [
                (j, float(probs_TE[t, block * K + j]))
                for j in range(K)
                if bool(routing_map_TE[t, block * K + j])
            ]
            if experts:
                rows.append((t, block, experts))
    return rows


def _weighted_expert_outputs(
    x_NH: torch.Tensor,
    probs_N: torch.Tensor,
    tokens_per_expert: Sequence[int],
    experts: Experts,
) -> torch.Tensor:
    """``probs * expert(x)`` for expert inputs grouped by local expert (``tokens_per_expert``
    rows each, ``experts`` this rank's callables in local order), the way Megatron's experts
    weight their output: ``[N, H]``."""
    chunks = torch.split(x_NH, tokens_per_expert)
    probs = torch.split(probs_N, tokens_per_expert)
    return torch.cat(
        [p[:, None].to(c.dtype) * expert(c) for expert, c, p in zip(experts, chunks, probs)]
    )


def _experts_on_rows(x_QH, row_idx_N, probs_N, tokens_per_expert, experts) -> torch.Tensor:
    """A destination rank's steps 4-5 in both simulators: the expanded copies of the received
    rows ``x_QH`` (``row_idx_N``, grouped by local expert), ``probs * expert(x)``, pre-combined
    back to one row per received row: ``[Q, H]``."""
    x_NH = x_QH.index_select(0, row_idx_N)
    y_NH = _weighted_expert_outputs(x_NH, probs_N, tokens_per_expert, experts)
    return precombine_rows(y_NH, row_idx_N, x_QH.shape[0])


def reference_send_rows(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, ep_size: int
) -> list[Row]:
    """Rows one rank sends: for each destination rank (ascending), for each token (ascending) that
    routes to at least one of its experts, one row with those experts' local ids and probs."""
    return _block_rows(routing_map_TE, probs_TE, ep_size, range(ep_size))


def reference_expand(
    received: Sequence[Row], num_local_experts: int
) -> list[list[tuple[int, float]]]:
    """For each local expert, the (received row index, prob) pairs it processes, in row order."""
    per_expert: list[list[tuple[int, float]]] = [[] for _ in range(num_local_experts)]
    for q, (_, _, experts) in enumerate(received):
        for j, prob in experts:
            per_expert[j].append((q, prob))
    return per_expert


def reference_precombine(
    y_NH: torch.Tensor, row_idx_N: Sequence[int], num_rows: int
) -> torch.Tensor:
    """Sum expert output rows that came from the same received row (loop)."""
    out = torch.zeros(num_rows, y_NH.shape[1], dtype=y_NH.dtype)
    for n, q in enumerate(row_idx_N):
        out[q] += y_NH[n]
    return out


def dense_moe_reference(
    x_TH: torch.Tensor,
    routing_map_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    experts: Experts,
) -> torch.Tensor:
    """out[t] = sum over routed experts e of probs[t, e] * experts[e](x[t]) (one process, all E
    experts given as callables ``[n, H] -> [n, H]``)."""
    out = torch.zeros_like(x_TH)
    for e, expert in enumerate(experts):
        tokens = routing_map_TE[:, e].nonzero(as_tuple=True)[0]
        if tokens.numel():
            out = out.index_add(0, tokens, probs_TE[tokens, e, None] * expert(x_TH[tokens]))
    return out


def simulate_dedup_moe(x_per_rank: PerRank, routing_maps: PerRank, probs_per_rank: PerRank,
                       experts: Experts, num_slots: int) -> list[torch.Tensor]:  # fmt: skip
    """The whole dedup dispatch -> experts -> combine path for P simulated ranks in one process,
    composed from the ``rows.py`` steps and :func:`reference_all_to_all` (no collectives).

    Experts are applied as ``probs * expert(x)``, the way Megatron's experts weight their output.
    Every size comes from the host copy of the count tables, as in the dispatcher (the
    sync-free ``num_rows`` / ``num_expert_rows`` paths of ``rows.py``).
    Returns each rank's ``[T_r, H]`` output; compare with :func:`dense_moe_reference`.
    """
    P = len(x_per_rank)
    E = routing_maps[0].shape[1]
    L = E // P
    counts = [count_send_rows(m, P) for m in routing_maps]
    tables = [c.counts_PC.tolist() for c in counts]  # tables[src][dst] = [rows, per expert...]
    splits = [[row[0] for row in table] for table in tables]
    sends = [
        build_send_rows(m, p, P, num_slots, counts=c, num_rows=sum(split))
        for m, p, c, split in zip(routing_maps, probs_per_rank, counts, splits)
    ]
    x_rows = [x.index_select(0, s.token_idx_R) for x, s in zip(x_per_rank, sends)]
    recv_x = reference_all_to_all(x_rows, splits)
    recv_meta = reference_all_to_all([s.meta_RM for s in sends], splits)
    back_rows = []
    for rank in range(P):
        tokens_per_expert = [sum(tables[src][rank][1 + j] for src in range(P)) for j in range(L)]
        exp = expand_rows(recv_meta[rank], L, num_expert_rows=sum(tokens_per_expert))
        local = experts[rank * L : (rank + 1) * L]
        back_rows.append(
            _experts_on_rows(recv_x[rank], exp.row_idx_N, exp.probs_N, tokens_per_expert, local)
        )
    # Combine: row chunk for source s sits at the same place in every receiver's output.
    recv_splits = [[splits[src][dst] for src in range(P)] for dst in range(P)]
    returned = reference_all_to_all(back_rows, recv_splits)
    return [
        combine_rows(y, s.token_idx_R, x.shape[0]) for y, s, x in zip(returned, sends, x_per_rank)
    ]


# --- two-level (node, then rank) communicator: loop oracles for comm/two_level.py ---


def reference_node_rows(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, num_nodes: int, own_node: int
) -> list[Row]:
    """Node rows one rank builds: its own node first, then the other nodes ascending; for each
    node, each token (ascending) with an expert there, carrying that node's experts."""
    order = [own_node] + [n for n in range(num_nodes) if n != own_node]
    return _block_rows(routing_map_TE, probs_TE, num_nodes, order)


def reference_rank_rows(
    node_experts: Sequence[Sequence[tuple[int, float]]], num_local_experts: int, ranks_per_node: int
) -> list[tuple[int, int, list[tuple[int, float]]]]:
    """Rank rows a relay builds from its node rows' (node-local id, prob) lists: for each rank g
    of the node (ascending), for each node row b (ascending) with an expert on g, one row
    ``(b, g, [(rank-local id, prob), ...])``."""
    L = num_local_experts
    rows = []
    for g in range(ranks_per_node):
        for b, experts in enumerate(node_experts):
            mine = [(j - g * L, p) for j, p in experts if g * L <= j < (g + 1) * L]
            if mine:
                rows.append((b, g, mine))
    return rows


def reference_expand_rank_rows(
    received: Sequence[tuple[int, list[tuple[int, float]]]], num_local_experts: int
) -> list[list[tuple[int, float]]]:
    """For each local expert, the (received rank row index, prob) pairs it processes, ordered by
    source EP rank, then arrival (``received`` holds (source rank, [(local id, prob), ...]))."""
    per_expert: list[list[tuple[int, int, float]]] = [[] for _ in range(num_local_experts)]
    for q, (src, experts) in enumerate(received):
        for j, prob in experts:
            per_expert[j].append((src, q, prob))
    return [[(q, p) for _, q, p in sorted(pairs, key=lambda s: s[:2])] for pairs in per_expert]


def reference_hop_counts(routing_maps: Sequence[torch.Tensor], ranks_per_node: int) -> list[dict]:
    """Brute-force rows on each hop for every EP rank, from all ranks' routing maps (loops over
    tokens and experts). Per rank: ``own_rows``, ``hop1_send``/``hop1_recv``/``hop2_send``/
    ``hop2_recv`` (one count per EP rank) and ``tokens_per_expert``."""
    P, G = len(routing_maps), ranks_per_node
    E = routing_maps[0].shape[1]
    L = E // P
    out = [
        dict(own_rows=0, hop1_send=[0] * P, hop1_recv=[0] * P, hop2_send=[0] * P,
             hop2_recv=[0] * P, tokens_per_expert=[0] * L)
        for _ in range(P)
    ]  # fmt: skip
    for src, routing_map in enumerate(routing_maps):
        for t in range(routing_map.shape[0]):
            experts = [e for e in range(E) if bool(routing_map[t, e])]
            for e in experts:
                out[e // L]["tokens_per_expert"][e % L] += 1
            for node in sorted({e // (G * L) for e in experts}):
                relay = node * G + src % G
                if node == src // G:
                    out[src]["own_rows"] += 1
                else:
                    out[src]["hop1_send"][relay] += 1
                    out[relay]["hop1_recv"][src] += 1
                for dest in sorted({e // L for e in experts if e // (G * L) == node}):
                    out[relay]["hop2_send"][dest] += 1
                    out[dest]["hop2_recv"][relay] += 1
    return out


def simulate_two_level_moe(x_per_rank: PerRank, routing_maps: PerRank, probs_per_rank: PerRank,
                           experts: Experts, ranks_per_node: int,
                           topk: int) -> list[torch.Tensor]:  # fmt: skip
    """The whole two-level path for P simulated ranks in one process, composed from the
    ``two_level.py`` steps and :func:`reference_all_to_all` (no collectives); compare with
    :func:`dense_moe_reference`. Experts are applied as ``probs * expert(x)``."""
    P, G = len(x_per_rank), ranks_per_node
    L = routing_maps[0].shape[1] // P
    topos = [NodeTopology(ep_size=P, ranks_per_node=G, rank=r) for r in range(P)]
    V, S = min(topk, G * L), min(topk, L)
    # Count tables -> every split size on the host (the dispatcher's one sync).
    tables = [two_level.build_count_table(m, t).counts_PC for m, t in zip(routing_maps, topos)]
    received = reference_all_to_all(tables, [[1] * P] * P)
    plans = [
        two_level.plan_hops(s.tolist(), r.tolist(), t) for s, r, t in zip(tables, received, topos)
    ]
    own = [plan.own_rows for plan in plans]
    # 1. Node rows (own node first); 2. hop 1 for the rest.
    nodes = [
        two_level.build_node_rows(m, p, t, V, table[::G, 0].tolist())
        for m, p, t, table in zip(routing_maps, probs_per_rank, topos, tables)
    ]
    x_B = [x.index_select(0, n.token_idx_B) for x, n in zip(x_per_rank, nodes)]
    hop1_send = [plan.hop1_send for plan in plans]
    recv1_x = reference_all_to_all([x[own[r] :] for r, x in enumerate(x_B)], hop1_send)
    recv1_m = reference_all_to_all([n.meta_BA[own[r] :] for r, n in enumerate(nodes)], hop1_send)
    # 3. Relays: own node rows + received node rows -> rank rows; hop 2.
    relay_x, relay_rows = [], []
    for r, plan in enumerate(plans):
        device = x_per_rank[r].device  # the oracle runs on the inputs' device (CUDA checks)
        hop1_src = torch.arange(P, device=device).repeat_interleave(
            torch.tensor(plan.hop1_recv, device=device), output_size=sum(plan.hop1_recv)
        )
        src_B = torch.cat([torch.full((own[r],), r, device=device), hop1_src])
        meta_B = torch.cat([nodes[r].meta_BA[: own[r]], recv1_m[r]])
        relay_rows.append(two_level.build_rank_rows(meta_B, src_B, L, G, S, sum(plan.hop2_send)))
        relay_x.append(torch.cat([x_B[r][: own[r]], recv1_x[r]]))
    hop2_send = [plan.hop2_send for plan in plans]
    x_R = [x.index_select(0, rr.node_row_idx_R) for x, rr in zip(relay_x, relay_rows)]
    recv2_x = reference_all_to_all(x_R, hop2_send)
    recv2_m = reference_all_to_all([rr.meta_RW for rr in relay_rows], hop2_send)
    # 4. Destinations: expand, experts, pre-combine.
    back2 = []
    for r, plan in enumerate(plans):
        tpe = plan.tokens_per_expert
        row_idx_N, probs_N = two_level.expand_rank_rows(recv2_m[r], L, P, sum(tpe))
        local = experts[r * L : (r + 1) * L]
        back2.append(_experts_on_rows(recv2_x[r], row_idx_N, probs_N, tpe, local))
    # Combine: hop 2 back, relay sums per node row, hop 1 back, source sums per token.
    returned2 = reference_all_to_all(back2, [plan.hop2_recv for plan in plans])
    node_y = [
        precombine_rows(y, rr.node_row_idx_R, x.shape[0])
        for y, rr, x in zip(returned2, relay_rows, relay_x)
    ]
    hop1_recv = [plan.hop1_recv for plan in plans]
    returned1 = reference_all_to_all([y[own[r] :] for r, y in enumerate(node_y)], hop1_recv)
    return [
        combine_rows(torch.cat([node_y[r][: own[r]], returned1[r]]), nodes[r].token_idx_B, T)
        for r, T in enumerate(x.shape[0] for x in x_per_rank)
    ]
