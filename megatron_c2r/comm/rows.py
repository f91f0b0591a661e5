"""Pure tensor functions for the de-duplicating expert-parallel (EP) communicator.

Megatron's alltoall dispatcher ships one copy of a token per selected expert. These functions
build one *row* per (token, destination EP rank) instead, carry the destination's local expert ids
and probs as per-row metadata, expand rows to (row, local expert) pairs on the receiving rank, and
reduce them back ("pre-combine") before the return trip. Every function is tensor-in/tensor-out,
runs on any device, and has a loop-based oracle in ``reference.py``.

Expert ids follow Megatron: EP rank r owns the contiguous block [r*L, (r+1)*L), L = E/P.

Host syncs: the hot path (``DedupAlltoAllTokenDispatcher``) first calls :func:`count_send_rows`
(no sync), exchanges the count table and copies it to the host once; that table gives every size
below (``num_rows``, ``num_expert_rows``), so :func:`build_send_rows` and :func:`expand_rows` run
without a sync (``nonzero_static`` with a host-known size). Without those sizes they fall back to
``nonzero``, one blocking sync each on CUDA: fine for tests and offline tools, not for training.

Shape suffixes: see the legend in ``megatron_c2r/comm/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def meta_dtype(probs_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-row metadata: the probs dtype promoted to at least fp32, so local expert
    ids (< 2**24) are exact and fp32/fp64 router probs travel unrounded (bf16 probs upcast
    exactly)."""
    return torch.promote_types(probs_dtype, torch.float32)


def _true_positions(mask: torch.Tensor, count: Optional[int]) -> torch.Tensor:
    """``[count, mask.dim()]`` int64 indices of the True entries of ``mask`` in row-major order.

    ``count`` is the host-known number of True entries (from the exchanged count table): then
    ``nonzero_static`` allocates the output without reading the device (no host sync). ``None``
    falls back to ``nonzero``, which syncs on CUDA to learn the output size. A zero ``count``
    (a rank that receives no rows, T = 0) returns the empty result without calling
    ``nonzero_static``, which crashes on an empty CUDA input in torch before pytorch#162473.
    """
    if count is None:
        return mask.nonzero()
    if count == 0:
        return torch.empty((0, mask.dim()), dtype=torch.int64, device=mask.device)
    return torch.nonzero_static(mask, size=count)


@dataclass(frozen=True)
class SendCounts:
    """What a rank knows before the dispatch all-to-all (output of :func:`count_send_rows`), all
    on the routing map's device, nothing copied to the host.

    Attributes:
        rank_mask_PT: ``[P, T]`` bool, token t has an expert on rank p (a transposed view).
        counts_PC: ``[P, 1 + L]`` int64. Column 0: rows for rank p (the dispatch input splits);
            column 1 + j: tokens this rank routes to rank p's local expert j.
        max_experts_per_row: 0-dim int64, the most experts one (token, rank) pair holds: the
            local experts a row would carry (the caller rejects more than S).
        routed_tokens: 0-dim int64, tokens with at least one expert (padding may route too).
    """

    rank_mask_PT: torch.Tensor
    counts_PC: torch.Tensor
    max_experts_per_row: torch.Tensor
    routed_tokens: torch.Tensor


def count_send_rows(routing_map_TE: torch.Tensor, ep_size: int) -> SendCounts:
    """Step 1 of dispatch: destination ranks per token and the count table to exchange.

    Args:
        routing_map_TE: ``[T, E]`` bool, Megatron's routing map.
        ep_size: P; E must be divisible by P.

    Returns:
        :class:`SendCounts` on the routing map's device. No communication, no host sync.
    """
    T, E = routing_map_TE.shape
    routing_map_TPL = routing_map_TE.view(T, ep_size, E // ep_size)
    experts_TP = routing_map_TPL.sum(dim=2)  # [T, P] experts of token t on rank p
    rank_mask_PT = (experts_TP > 0).T  # rank p is a destination if it holds any routed expert
    counts_PC = torch.cat(
        [
            rank_mask_PT.sum(dim=1, keepdim=True),
            routing_map_TPL.sum(dim=0),  # [P, L] tokens per (destination rank, local expert)
        ],
        dim=1,
    ).long()
    no_tokens = experts_TP.new_zeros(1)  # max() of an empty tensor raises (T = 0)
    return SendCounts(
        rank_mask_PT=rank_mask_PT,
        counts_PC=counts_PC,
        max_experts_per_row=torch.cat([experts_TP.reshape(-1), no_tokens]).max().long(),
        routed_tokens=rank_mask_PT.any(dim=0).sum(),
    )


@dataclass(frozen=True)
class SendRows:
    """What a rank sends in the dispatch all-to-all (output of :func:`build_send_rows`).

    Attributes:
        token_idx_R: ``[R]`` int64, source token of each row; rows grouped by destination rank,
            token order inside a group.
        meta_RM: ``[R, 2S]`` :func:`meta_dtype` of probs; slot probs then slot local expert ids
            (-1 for an empty slot). Differentiable w.r.t. ``probs_TE``.
        counts_PC, max_experts_per_row, routed_tokens: as in :class:`SendCounts` (the same
            tensors when ``counts`` was passed in).
    """

    token_idx_R: torch.Tensor
    meta_RM: torch.Tensor
    counts_PC: torch.Tensor
    max_experts_per_row: torch.Tensor
    routed_tokens: torch.Tensor


def build_send_rows(
    routing_map_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    ep_size: int,
    num_slots: int,
    *,
    counts: Optional[SendCounts] = None,
    num_rows: Optional[int] = None,
) -> SendRows:
    """Step 2 of dispatch: one row per (token, destination rank) with its local experts' metadata.

    Args:
        routing_map_TE: ``[T, E]`` bool, Megatron's routing map.
        probs_TE: ``[T, E]`` float, Megatron's dense probs (only routed entries are read).
        ep_size: P; E must be divisible by P.
        num_slots: S, metadata slots per row (``min(topk, E/P)``); rows holding more experts are
            reported through ``max_experts_per_row`` (the caller must reject them first).
        counts: :func:`count_send_rows` of the same map, if the caller has it (not recomputed).
        num_rows: R as a host int (the sum of ``counts_PC[:, 0]``, read from the exchanged
            table): the rows are then found without a host sync. ``None``: one ``nonzero``
            (a blocking sync on CUDA).

    Returns:
        :class:`SendRows` on the routing map's device. No communication.
    """
    T, E = routing_map_TE.shape
    L = E // ep_size
    if counts is None:
        counts = count_send_rows(routing_map_TE, ep_size)
    # One row per (destination rank, token), rank-major so each rank's rows are contiguous.
    rank_token_R2 = _true_positions(counts.rank_mask_PT, num_rows)
    rank_R, token_idx_R = rank_token_R2[:, 0], rank_token_R2[:, 1]
    local_map_RL = routing_map_TE.view(T, ep_size, L)[token_idx_R, rank_R]  # [R, L] bool
    probs_RL = probs_TE.view(T, ep_size, L)[token_idx_R, rank_R]  # [R, L], differentiable
    # Routed local experts first (ascending id), then the unrouted ones; keep the first S.
    arange_L = torch.arange(L, device=routing_map_TE.device)
    order_key_RL = torch.where(local_map_RL, arange_L, arange_L + L)
    slot_expert_RS = order_key_RL.sort(dim=1).indices[:, :num_slots]
    slot_used_RS = local_map_RL.gather(1, slot_expert_RS)
    dtype = meta_dtype(probs_TE.dtype)
    zero = probs_RL.new_zeros(())
    slot_probs_RS = torch.where(slot_used_RS, probs_RL.gather(1, slot_expert_RS), zero).to(dtype)
    slot_ids_RS = torch.where(slot_used_RS, slot_expert_RS, -1).to(dtype)
    return SendRows(
        token_idx_R=token_idx_R,
        meta_RM=torch.cat([slot_probs_RS, slot_ids_RS], dim=1),
        counts_PC=counts.counts_PC,
        max_experts_per_row=counts.max_experts_per_row,
        routed_tokens=counts.routed_tokens,
    )


@dataclass(frozen=True)
class ExpandedRows:
    """Received rows expanded to (row, local expert) pairs, grouped by local expert (step 4).

    Attributes:
        row_idx_N: ``[N]`` int64, received row feeding each expert input row. Inside one local
            expert, rows keep source-rank-then-token order: the order Megatron's alltoall gives.
        expert_N: ``[N]`` int64, the local expert of each expert input row (non-decreasing).
        probs_N: ``[N]`` probs dtype of the metadata, differentiable w.r.t. ``meta_QM``.
        num_local_experts: L.
    """

    row_idx_N: torch.Tensor
    expert_N: torch.Tensor
    probs_N: torch.Tensor
    num_local_experts: int

    @property
    def tokens_per_expert_L(self) -> torch.Tensor:
        """``[L]`` int64 on the rows' device. Cold path only (``bincount`` syncs on CUDA); the
        dispatcher takes these counts from the exchanged table instead."""
        return torch.bincount(self.expert_N, minlength=self.num_local_experts)


def expand_rows(
    meta_QM: torch.Tensor, num_local_experts: int, num_expert_rows: Optional[int] = None
) -> ExpandedRows:
    """Step 4 (receiving rank): one expert-input row per (received row, routed local expert).

    Args:
        meta_QM: ``[Q, 2S]`` received metadata (slot probs, slot local expert ids, -1 empty).
        num_local_experts: L.
        num_expert_rows: N as a host int (the tokens this rank's experts receive, summed from the
            exchanged count table): no host sync. ``None``: one ``nonzero`` (syncs on CUDA).

    Returns:
        :class:`ExpandedRows`; no communication. ``x_QH.index_select(0, row_idx_N)`` gives the
        experts' input.
    """
    Q, S, L = meta_QM.shape[0], meta_QM.shape[1] // 2, num_local_experts
    probs_QS, ids_QS = meta_QM[:, :S], meta_QM[:, S:].detach().long()
    # slot_QL[q, j]: the slot of row q that carries local expert j, or S if none. Empty slots
    # (-1) write into a spare column L, dropped right after.
    column_QS = torch.where(ids_QS >= 0, ids_QS, L)
    arange_QS = torch.arange(S, device=meta_QM.device).expand(Q, S)
    slot_QL = torch.full((Q, L + 1), S, dtype=torch.long, device=meta_QM.device)
    slot_QL = slot_QL.scatter(1, column_QS, arange_QS)[:, :L]
    # Expert-major enumeration of the carried (row, expert) pairs: grouped by local expert,
    # received-row order inside each expert, no sort needed.
    expert_row_N2 = _true_positions((slot_QL < S).T, num_expert_rows)
    expert_N, row_idx_N = expert_row_N2[:, 0], expert_row_N2[:, 1]
    probs_N = probs_QS[row_idx_N, slot_QL[row_idx_N, expert_N]]
    return ExpandedRows(row_idx_N, expert_N, probs_N, L)


def precombine_rows(y_NH: torch.Tensor, row_idx_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Step 5 (receiving rank): sum the (already prob-weighted) expert outputs of each received row
    into one row, so the combine all-to-all ships as many rows as dispatch did.

    Args:
        y_NH: ``[N, H]`` expert outputs, grouped by local expert (the order of ``row_idx_N``).
        row_idx_N: ``[N]`` int64 from :func:`expand_rows`.
        num_rows: Q, rows received in dispatch.

    Returns:
        ``[Q, H]`` same dtype/device as ``y_NH`` (summed in that dtype, like Megatron's
        unpermute). Differentiable; no communication, no host sync.
    """
    y_QH = y_NH.new_zeros((num_rows, y_NH.shape[1]))
    return y_QH.index_add(0, row_idx_N, y_NH)


def combine_rows(y_RH: torch.Tensor, token_idx_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Step 6 (source rank): sum the rows coming back from each destination rank into the token.

    Args:
        y_RH: ``[R, H]`` rows returned by the combine all-to-all (same order as sent).
        token_idx_R: ``[R]`` int64 from :func:`build_send_rows`.
        num_tokens: T.

    Returns:
        ``[T, H]``; tokens with no expert get zeros. Differentiable; no communication, no host
        sync.
    """
    out_TH = y_RH.new_zeros((num_tokens, y_RH.shape[1]))
    return out_TH.index_add(0, token_idx_R, y_RH)
