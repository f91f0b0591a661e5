"""Pure row functions for the two-level (node, then rank) de-duplicating EP communicator.

The flat dedup communicator (``rows.py``) ships one row per (token, destination *rank*), so a token
whose experts sit on three ranks of one remote node crosses the inter-node link three times. Here a
token crosses it once per destination *node*, DeepEP-style:

    source (d, g) --hop 1, inter-node, rail g--> relay (d', g) --hop 2, intra-node--> rank (d', g')

1. Source: one *node row* per (token, destination node) carrying that node's expert slots and probs.
   Rows for the source's own node skip hop 1 (the source is its own relay).
2. Hop 1 sends the other node rows to the rank with the same local index on each node (the rail).
3. Relay: one *rank row* per (node row, destination rank of its node) with that rank's local slots.
4. Hop 2 sends rank rows inside the node; the destination expands them to (row, local expert) in
   Megatron's order. Combine mirrors it: pre-combine per rank row, the relay sums a node row's rank
   rows, hop 1 back, the source sums a token's node rows.

Every size comes from one count table exchanged over the EP group (:func:`build_count_table`,
:func:`plan_hops`), so the forward pass needs one host sync; the functions below take those host
sizes and never sync themselves. Loop oracles: ``reference.py`` (two-level section).

Shape suffixes: the ``comm/`` legend (``megatron_c2r/comm/__init__.py``: T, H, E, P, L, S, R, Q,
N, C with their meanings there; here R and Q are rank rows a relay sends and a rank receives, and
S = min(topk, L) the rank-row slots), plus the letters of the two-level path:
    D   nodes the EP group spans             G   EP ranks per node (P = D * G)
    J   experts per node (G * L)             V   node-row slots, min(topk, J)
    A   node-row metadata columns: 2V (slot probs, then node-local expert ids, -1 = empty)
    W   rank-row metadata columns: 2S + 1 (slot probs, rank-local ids, then the source EP rank)
    B   node rows: on a source its own-node rows then hop-1 rows; on a relay its own-node rows
        then the hop-1 rows it received (grouped by source rank)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from megatron_c2r.comm.accounting import CommStats, Ratio, stats_from_counts
from megatron_c2r.comm.rows import meta_dtype
from megatron_c2r.comm.topology import NodeTopology


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of the True entries of a 1-D bool mask, without a host sync.

    ``mask.nonzero()`` must copy its size to the host; here the size ``count`` (a host int from
    the exchanged count table) is known, so the k-th True entry is the first position where the
    running count reaches k (``searchsorted`` on the cumulative sum; deterministic).

    Args:
        mask: 1-D bool. count: the number of True entries (the caller's promise).
    Returns:
        ``[count]`` int64 on the mask's device (no kernel at all when ``count`` is 0).
    """
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=mask.device)
    running = mask.cumsum(0)
    wanted = torch.arange(1, count + 1, device=mask.device, dtype=running.dtype)
    return torch.searchsorted(running, wanted)


@dataclass(frozen=True)
class CountTable:
    """What a source tells every EP rank before any row moves (output of :func:`build_count_table`).

    Attributes:
        counts_PC: ``[P, C]`` int64, C = G + L + 3; row p (p on node d) holds
            column 0: node rows for node d (tokens with an expert on node d);
            columns 1..G: rank rows for each rank of node d (tokens with an expert on it);
            columns 1+G..G+L: tokens routed to each of rank p's local experts;
            column C-2: the most experts any of this source's (token, node) rows carries;
            column C-1: 1 if this source's router logits were finite (0 otherwise).
        routed_tokens: 0-dim int64, tokens with at least one expert.
    """

    counts_PC: torch.Tensor
    routed_tokens: torch.Tensor


def build_count_table(
    routing_map_TE: torch.Tensor,
    topology: NodeTopology,
    logits_finite: Optional[torch.Tensor] = None,
) -> CountTable:
    """The per-destination counts that size both hops (no communication, no host sync).

    Args:
        routing_map_TE: ``[T, E]`` bool, Megatron's routing map; E divisible by P.
        topology: the EP group's node layout.
        logits_finite: optional 0-dim bool/int device flag from the router (deferred finite
            check); it travels in the last column so every rank can raise together.
    """
    T, E = routing_map_TE.shape
    P, D, G = topology.ep_size, topology.num_nodes, topology.ranks_per_node
    L = E // P
    map_TDGL = routing_map_TE.view(T, D, G, L)
    rank_mask_TDG = map_TDGL.any(dim=3)
    node_mask_TD = rank_mask_TDG.any(dim=2)
    experts_per_row = map_TDGL.view(T, D, G * L).sum(dim=2).flatten()
    worst = torch.cat([experts_per_row, experts_per_row.new_zeros(1)]).max()  # max() of [] raises
    finite = worst.new_ones(()) if logits_finite is None else logits_finite.to(worst.dtype)
    counts_PC = torch.cat(
        [
            node_mask_TD.sum(dim=0)[:, None].expand(D, G).reshape(P, 1),
            rank_mask_TDG.sum(dim=0)[:, None, :].expand(D, G, G).reshape(P, G),
            map_TDGL.sum(dim=0).reshape(P, L),
            worst.expand(P, 1),
            finite.expand(P, 1),
        ],
        dim=1,
    ).long()
    return CountTable(counts_PC=counts_PC, routed_tokens=node_mask_TD.any(dim=1).sum())


@dataclass(frozen=True)
class HopPlan:
    """Host-side split sizes of both hops for one forward pass on one rank (:func:`plan_hops`).

    Split lists have one entry per EP rank (all-to-alls run over the EP group; peers this rank
    does not talk to on a hop get 0).

    Attributes:
        own_rows: node rows for this rank's own node (they skip hop 1).
        hop1_send, hop1_recv: node rows to / from each EP rank over the inter-node hop (non-zero
            only for this rank's rail peers on other nodes).
        hop2_send, hop2_recv: rank rows to / from each EP rank over the intra-node hop (non-zero
            only for ranks of this node, self included).
        tokens_per_expert: rows each local expert receives (Megatron's ``tokens_per_expert``).
        max_experts_per_row: the most experts any source's (token, node) row carries.
        sources_not_finite: EP ranks whose router logits were not finite (empty when fine).
    """

    own_rows: int
    hop1_send: list
    hop1_recv: list
    hop2_send: list
    hop2_recv: list
    tokens_per_expert: list
    max_experts_per_row: int
    sources_not_finite: list


def plan_hops(
    send_PC: Sequence[Sequence[int]], recv_PC: Sequence[Sequence[int]], topology: NodeTopology
) -> HopPlan:
    """Both hops' split sizes from the count table this rank sent and the one it received (pure
    Python on host ints, O(P * C)).

    Why one table suffices: relay (d, g) forwards exactly the rows of its rail sources (d', g),
    and each source told it how many rows it has for every rank of node d; a destination (d, g')
    hears from every source (d', g) how many rank rows it will get, and those arrive through
    relay (d, g).
    """
    P, G = topology.ep_size, topology.ranks_per_node
    node, g, me = topology.node, topology.local_index, topology.rank
    L = len(send_PC[0]) - G - 3

    def remote_rail(r: int) -> bool:
        return r % G == g and r // G != node

    hop2_send, hop2_recv = [0] * P, [0] * P
    for g2 in range(G):
        peer = topology.rank_of(node, g2)
        # relay: rows its rail sources (all nodes, self included) have for rank g2 of this node
        hop2_send[peer] = sum(recv_PC[s][1 + g2] for s in range(g, P, G))
        # destination: rank rows for me from the sources on rail g2, relayed by rank g2
        hop2_recv[peer] = sum(recv_PC[s][1 + g] for s in range(g2, P, G))
    return HopPlan(
        own_rows=send_PC[me][0],
        hop1_send=[send_PC[d][0] if remote_rail(d) else 0 for d in range(P)],
        hop1_recv=[recv_PC[s][0] if remote_rail(s) else 0 for s in range(P)],
        hop2_send=hop2_send,
        hop2_recv=hop2_recv,
        tokens_per_expert=[sum(recv_PC[s][1 + G + j] for s in range(P)) for j in range(L)],
        max_experts_per_row=max(row[-2] for row in recv_PC),
        sources_not_finite=[s for s in range(P) if recv_PC[s][-1] == 0],
    )


def _node_slots(local_map_BJ: torch.Tensor, probs_BJ: torch.Tensor, num_slots: int):
    """Routed experts first (ascending id), then unrouted; keep the first ``num_slots`` (V).
    Returns (slot probs, slot ids with -1 for empty), both ``[B, V]``."""
    J = local_map_BJ.shape[1]
    arange_J = torch.arange(J, device=local_map_BJ.device)
    order_key_BJ = torch.where(local_map_BJ, arange_J, arange_J + J)
    slot_expert_BV = order_key_BJ.sort(dim=1).indices[:, :num_slots]
    used_BV = local_map_BJ.gather(1, slot_expert_BV)
    probs_BV = torch.where(used_BV, probs_BJ.gather(1, slot_expert_BV), probs_BJ.new_zeros(()))
    return probs_BV, torch.where(used_BV, slot_expert_BV, -1)


@dataclass(frozen=True)
class NodeRows:
    """A source's node rows (output of :func:`build_node_rows`): own-node rows first, then the
    hop-1 rows grouped by destination node (= by destination rail peer, ascending EP rank).

    Attributes:
        token_idx_B: ``[B]`` int64 source token of each row (token order inside a node).
        meta_BA: ``[B, 2V]`` :func:`meta_dtype` of probs: slot probs, then node-local expert
            ids (ascending, -1 for empty slots, used slots first). Differentiable w.r.t. probs.
    """

    token_idx_B: torch.Tensor
    meta_BA: torch.Tensor


def build_node_rows(
    routing_map_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    topology: NodeTopology,
    num_slots: int,
    node_rows: Sequence[int],
) -> NodeRows:
    """Step 1: one row per (token, destination node) with that node's expert slots (no sync).

    Args:
        routing_map_TE: ``[T, E]`` bool. probs_TE: ``[T, E]`` float (routed entries read).
        topology: node layout. num_slots: V = min(topk, J).
        node_rows: host ints, rows per destination node (column 0 of the count table, one entry
            per node), so no ``nonzero`` is needed.
    """
    T, E = routing_map_TE.shape
    D, own = topology.num_nodes, topology.node
    J = E // D
    map_TDJ = routing_map_TE.view(T, D, J)
    node_mask_DT = map_TDJ.any(dim=2).T  # node-major, so a node's rows are contiguous
    pos_B = true_positions(node_mask_DT.flatten(), sum(node_rows))
    before, mine = sum(node_rows[:own]), node_rows[own]
    rest = pos_B.shape[0] - before - mine
    pos_B = torch.cat([pos_B.narrow(0, before, mine), pos_B.narrow(0, 0, before),
                       pos_B.narrow(0, before + mine, rest)])  # fmt: skip
    node_B, token_idx_B = pos_B // T, pos_B % T
    # index_select on [T*D, J] rows (not map[t, d] advanced indexing): its backward is an
    # index_add, which never syncs.
    flat_B = token_idx_B * D + node_B
    local_map_BJ = map_TDJ.reshape(T * D, J).index_select(0, flat_B)
    probs_BJ = probs_TE.reshape(T * D, J).index_select(0, flat_B)
    probs_BV, ids_BV = _node_slots(local_map_BJ, probs_BJ, num_slots)
    dtype = meta_dtype(probs_TE.dtype)
    return NodeRows(token_idx_B, torch.cat([probs_BV.to(dtype), ids_BV.to(dtype)], dim=1))


@dataclass(frozen=True)
class RankRows:
    """A relay's rank rows (output of :func:`build_rank_rows`), grouped by destination rank.

    Attributes:
        node_row_idx_R: ``[R]`` int64, the relay's node row each rank row copies (the combine
            sums rank rows back into it).
        meta_RW: ``[R, 2S + 1]``: slot probs, rank-local expert ids (-1 empty), source EP rank.
            Differentiable w.r.t. the node rows' metadata probs.
    """

    node_row_idx_R: torch.Tensor
    meta_RW: torch.Tensor


def build_rank_rows(
    meta_BA: torch.Tensor,
    src_rank_B: torch.Tensor,
    num_local_experts: int,
    ranks_per_node: int,
    num_slots: int,
    num_rows: int,
) -> RankRows:
    """Step 3 (relay): one rank row per (node row, rank of this node with a routed expert).

    Args:
        meta_BA: ``[B, 2V]`` node rows' metadata (own rows, then received hop-1 rows); slot ids
            ascending with used slots first, as :func:`build_node_rows` writes them, so one
            rank's slots are a contiguous run.
        src_rank_B: ``[B]`` int64, the EP rank each node row came from (kept for the
            destination's Megatron-order sort).
        num_local_experts: L. ranks_per_node: G. num_slots: S = min(topk, L).
        num_rows: R, rank rows in total (host int from the count table).
    """
    B, V = meta_BA.shape[0], meta_BA.shape[1] // 2
    L, G, S = num_local_experts, ranks_per_node, num_slots
    probs_BV, ids_BV = meta_BA[:, :V], meta_BA[:, V:].detach().long()
    dest_BV = torch.where(ids_BV >= 0, ids_BV // L, G)  # G = "no rank" column, dropped below
    rank_mask_BG = torch.zeros(B, G + 1, dtype=torch.bool, device=meta_BA.device)
    rank_mask_BG = rank_mask_BG.scatter(1, dest_BV, True)[:, :G]
    pos_R = true_positions(rank_mask_BG.T.flatten(), num_rows)  # rank-major: grouped by rank
    dest_R, node_row_idx_R = pos_R // B, pos_R % B
    # Rank g's slots start after the used slots with smaller ids; take S from there.
    ids_RV = ids_BV.index_select(0, node_row_idx_R)
    first_R = ((ids_RV >= 0) & (ids_RV < (dest_R * L)[:, None])).sum(dim=1)
    pick_RS = first_R[:, None] + torch.arange(S, device=meta_BA.device)
    in_row_RS = pick_RS < V
    pick_RS = pick_RS.clamp(max=V - 1)
    chosen_RS = ids_RV.gather(1, pick_RS)
    valid_RS = in_row_RS & (chosen_RS >= 0) & (chosen_RS // L == dest_R[:, None])
    probs_RS = probs_BV.index_select(0, node_row_idx_R).gather(1, pick_RS)
    probs_RS = torch.where(valid_RS, probs_RS, probs_RS.new_zeros(()))
    local_ids_RS = torch.where(valid_RS, chosen_RS - (dest_R * L)[:, None], -1)
    src_R1 = src_rank_B.index_select(0, node_row_idx_R)[:, None]
    dtype = meta_BA.dtype
    meta_RW = torch.cat([probs_RS, local_ids_RS.to(dtype), src_R1.to(dtype)], dim=1)
    return RankRows(node_row_idx_R, meta_RW)


def expand_rank_rows(
    meta_QW: torch.Tensor, num_local_experts: int, ep_size: int, num_expert_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 (destination): one expert-input row per (received rank row, routed local expert).

    Rows come out grouped by local expert and, inside an expert, by source EP rank then token:
    the order Megatron's alltoall hands its experts (a stable sort on expert * P + source rank;
    rows of one source arrive in token order through its one relay).

    Args:
        meta_QW: ``[Q, 2S + 1]`` received rank-row metadata.
        num_local_experts: L. ep_size: P.
        num_expert_rows: N = sum of tokens_per_expert (host int from the count table).

    Returns:
        ``row_idx_N`` (``[N]`` int64, the rank row feeding each expert input row) and ``probs_N``
        (``[N]`` metadata dtype, differentiable). No sync, no communication.
    """
    S = (meta_QW.shape[1] - 1) // 2
    probs_QS, ids_QS = meta_QW[:, :S], meta_QW[:, S : 2 * S].detach().long()
    src_Q1 = meta_QW[:, 2 * S :].detach().long()
    unused = num_local_experts * ep_size  # sorts after every real key
    key_QS = torch.where(ids_QS >= 0, ids_QS * ep_size + src_Q1, unused)
    order_N = key_QS.flatten().sort(stable=True).indices[:num_expert_rows]
    return order_N // S, probs_QS.flatten().index_select(0, order_N)


def count_two_level_rows(routing_map_TE: torch.Tensor, topology: NodeTopology) -> dict:
    """What one source's tokens cost on each hop, straight from the routing map (vectorised; the
    analytic counter for volume studies, proved equal to the dispatcher's counters in tests).

    Returns a dict of ints: ``inter_node_rows`` (one per (token, other node)), ``own_node_rows``,
    ``rank_rows`` (one per (token, rank) = the flat dedup count), ``flat_inter_node_rows`` (flat
    dedup rows to ranks on other nodes), ``megatron_rows``, ``megatron_inter_node_rows`` (one per
    (token, expert on another node)), ``routed_tokens``.
    """
    T, E = routing_map_TE.shape
    D, G, own = topology.num_nodes, topology.ranks_per_node, topology.node
    map_TDGL = routing_map_TE.view(T, D, G, E // (D * G))
    rank_mask_TDG = map_TDGL.any(dim=3)
    node_mask_TD = rank_mask_TDG.any(dim=2)
    per_node = dict(
        nodes=node_mask_TD.sum(dim=0), ranks=rank_mask_TDG.sum(dim=(0, 2)),
        experts=map_TDGL.sum(dim=(0, 2, 3)),
    )  # fmt: skip
    remote = {k: int(v.sum() - v[own]) for k, v in per_node.items()}
    return dict(
        inter_node_rows=remote["nodes"],
        own_node_rows=int(per_node["nodes"][own]),
        rank_rows=int(per_node["ranks"].sum()),
        flat_inter_node_rows=remote["ranks"],
        megatron_rows=int(per_node["experts"].sum()),
        megatron_inter_node_rows=remote["experts"],
        routed_tokens=int(node_mask_TD.any(dim=1).sum()),
    )


def expected_inter_node_rows_per_token_uniform(
    num_experts: int, topk: int, num_nodes: int
) -> float:
    """E[rows per token over the inter-node hop] when each token picks ``topk`` of ``num_experts``
    uniformly and each of D = ``num_nodes`` nodes owns E/D experts: the expected distinct nodes
    D * (1 - C(E - E/D, k) / C(E, k)) times the share (D - 1) / D that is not the token's own."""
    per_node = num_experts // num_nodes
    nodes = num_nodes * (1 - math.comb(num_experts - per_node, topk) / math.comb(num_experts, topk))
    return nodes * (num_nodes - 1) / num_nodes


@dataclass
class TwoLevelCommStats(CommStats):
    """Counters of the two-level dispatcher for one MoE layer on one rank (plain ints).

    The inherited :class:`CommStats` fields keep their flat meaning, computed from the same count
    table: what the flat dedup dispatcher would record for this routing (rows per (token, rank),
    Megatron's rows), so logged ``ranks_per_token`` stays comparable across dispatchers. The
    fields below are what the two hops actually carry, per rank, forward pass only (backward
    ships the same rows the other way). "Remote" excludes rows a rank addresses to itself.
    """

    own_node_rows: int = 0  # node rows for the source's own node: they skip hop 1
    inter_node_rows_sent: int = 0  # hop 1: one per (token, other node) = DeepEP's per-node copies
    inter_node_rows_received: int = 0  # as relay; also the rows it sends back in the hop-1 combine
    intra_node_rows_sent: int = 0  # hop 2, as relay: one per (node row, rank), self included
    intra_node_rows_sent_remote: int = 0
    intra_node_rows_received: int = 0  # as destination; also the rows it sends back in hop 2
    intra_node_rows_received_remote: int = 0
    inter_node_bytes: int = 0  # hop 1 both ways: rows sent * (hidden + 2V meta) + received * hidden
    intra_node_bytes_remote: int = 0  # hop 2 both ways, rows to/from other ranks only
    flat_inter_node_rows: int = 0  # the flat dedup's rows to ranks on other nodes (these tokens)
    megatron_inter_node_rows: int = 0  # Megatron alltoall's rows to other nodes (these tokens)
    megatron_inter_node_bytes: int = 0  # both ways: sent * (hidden + prob) + returned * hidden

    RATIOS: ClassVar[tuple[str, ...]] = CommStats.RATIOS + (
        "inter_node_rows_per_token", "inter_node_byte_reduction"
    )

    inter_node_rows_per_token = Ratio("inter_node_rows_sent", over="routed_tokens")
    """Rows this rank's tokens send over the inter-node hop, per routed token."""
    inter_node_byte_reduction = Ratio("megatron_inter_node_bytes", over="inter_node_bytes")
    """Megatron alltoall's inter-node bytes / ours (both directions)."""


def two_level_stats(plan: HopPlan, send_PC: Sequence[Sequence[int]],
                    recv_PC: Sequence[Sequence[int]], topology: NodeTopology, *, tokens: int,
                    routed_tokens: int, hidden_bytes_per_row: int, meta_bytes_per_column: int,
                    num_slots: tuple[int, int], prob_bytes: int) -> TwoLevelCommStats:  # fmt: skip
    """One forward pass's :class:`TwoLevelCommStats` from the host count tables (no device work).

    Args:
        plan: :func:`plan_hops` of the same tables. send_PC, recv_PC: the host count tables.
        topology: node layout. tokens, routed_tokens: local token counts.
        hidden_bytes_per_row: H * element size. meta_bytes_per_column: metadata element size.
        num_slots: (V, S). prob_bytes: element size of one prob (Megatron's second all-to-all).
    """
    G, node, g, me = topology.ranks_per_node, topology.node, topology.local_index, topology.rank
    P, L = topology.ep_size, len(send_PC[0]) - G - 3
    V, S = num_slots
    # The flat dedup's table for the same routing: [rows to rank d, tokens per expert of d].
    flat_send = [[send_PC[d][1 + d % G]] + list(send_PC[d][1 + G : 1 + G + L]) for d in range(P)]
    flat_recv = [[recv_PC[s][1 + g]] + list(recv_PC[s][1 + G : 1 + G + L]) for s in range(P)]
    base = stats_from_counts(
        flat_send, flat_recv, rank=me, tokens=tokens, routed_tokens=routed_tokens,
        hidden_bytes_per_row=hidden_bytes_per_row,
        meta_bytes_per_row=2 * S * meta_bytes_per_column, prob_bytes=prob_bytes,
    )  # fmt: skip
    off_node = [r for r in range(P) if r // G != node]
    sent1, recv1 = sum(plan.hop1_send), sum(plan.hop1_recv)
    sent2, recv2 = sum(plan.hop2_send), sum(plan.hop2_recv)
    sent2_remote, recv2_remote = sent2 - plan.hop2_send[me], recv2 - plan.hop2_recv[me]
    mrows_out = sum(sum(flat_send[d][1:]) for d in off_node)
    mrows_back = sum(sum(flat_recv[s][1:]) for s in off_node)
    return TwoLevelCommStats(
        **dataclasses.asdict(base),
        own_node_rows=plan.own_rows,
        inter_node_rows_sent=sent1, inter_node_rows_received=recv1,
        intra_node_rows_sent=sent2, intra_node_rows_sent_remote=sent2_remote,
        intra_node_rows_received=recv2, intra_node_rows_received_remote=recv2_remote,
        inter_node_bytes=sent1 * (hidden_bytes_per_row + 2 * V * meta_bytes_per_column)
        + recv1 * hidden_bytes_per_row,
        intra_node_bytes_remote=sent2_remote
        * (hidden_bytes_per_row + (2 * S + 1) * meta_bytes_per_column)
        + recv2_remote * hidden_bytes_per_row,
        flat_inter_node_rows=sum(flat_send[d][0] for d in off_node),
        megatron_inter_node_rows=mrows_out,
        megatron_inter_node_bytes=mrows_out * (hidden_bytes_per_row + prob_bytes)
        + mrows_back * hidden_bytes_per_row,
    )
