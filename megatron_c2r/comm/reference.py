"""Single-process oracles for every step of the de-duplicating communicator.

Each function here is written as plainly as possible (Python loops over tokens, ranks and experts)
so the vectorised functions in ``rows.py`` and the multi-process dispatcher can be tested against
something obviously right. Not for production use: they are O(T * E) Python.

Shape suffixes: see the legend in ``megatron_c2r/comm/__init__.py``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_c2r.comm.all_to_all import reference_all_to_all
from megatron_c2r.comm.rows import (
    build_send_rows,
    combine_rows,
    count_send_rows,
    expand_rows,
    precombine_rows,
)

# One row: (source token, destination rank, [(local expert id, prob), ...] in ascending id order).
Row = tuple[int, int, list[tuple[int, float]]]


def reference_send_rows(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, ep_size: int
) -> list[Row]:
    """Rows one rank sends: for each destination rank (ascending), for each token (ascending) that
    routes to at least one of its experts, one row with those experts' local ids and probs."""
    T, E = routing_map_TE.shape
    L = E // ep_size
    rows: list[Row] = []
    for rank in range(ep_size):
        for t in range(T):
            experts = [
                (j, float(probs_TE[t, rank * L + j]))
                for j in range(L)
                if bool(routing_map_TE[t, rank * L + j])
            ]
            if experts:
                rows.append((t, rank, experts))
    return rows


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
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """out[t] = sum over routed experts e of probs[t, e] * experts[e](x[t]) (one process, all E
    experts given as callables ``[n, H] -> [n, H]``)."""
    out = torch.zeros_like(x_TH)
    for e, expert in enumerate(experts):
        tokens = routing_map_TE[:, e].nonzero(as_tuple=True)[0]
        if tokens.numel():
            out = out.index_add(0, tokens, probs_TE[tokens, e, None] * expert(x_TH[tokens]))
    return out


def simulate_dedup_moe(
    x_per_rank: Sequence[torch.Tensor],
    routing_maps: Sequence[torch.Tensor],
    probs_per_rank: Sequence[torch.Tensor],
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    num_slots: int,
) -> list[torch.Tensor]:
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
        x_NH = recv_x[rank].index_select(0, exp.row_idx_N)
        chunks = torch.split(x_NH, tokens_per_expert)
        probs = torch.split(exp.probs_N, tokens_per_expert)
        y_NH = torch.cat(
            [
                p[:, None].to(c.dtype) * experts[rank * L + j](c)
                for j, (c, p) in enumerate(zip(chunks, probs))
            ]
        )
        back_rows.append(precombine_rows(y_NH, exp.row_idx_N, recv_x[rank].shape[0]))
    # Combine: row chunk for source s sits at the same place in every receiver's output.
    recv_splits = [[splits[src][dst] for src in range(P)] for dst in range(P)]
    returned = reference_all_to_all(back_rows, recv_splits)
    return [
        combine_rows(y, s.token_idx_R, x.shape[0]) for y, s, x in zip(returned, sends, x_per_rank)
    ]
