"""Pure tensor functions for the de-duplicating expert-parallel (EP) communicator.

Megatron's alltoall dispatcher ships one copy of a token per selected expert. These functions
build one *row* per (token, destination EP rank) instead, carry the destination's local expert ids
and probs as per-row metadata, expand rows to (row, local expert) pairs on the receiving rank, and
reduce them back ("pre-combine") before the return trip. Every function is tensor-in/tensor-out,
runs on any device, and has a loop-based oracle in ``reference.py``.

Expert ids follow Megatron: EP rank r owns the contiguous block [r*L, (r+1)*L), L = E/P.

Legend for shape suffixes:
    T   tokens on this rank (S*B after flattening)        H   hidden size
    E   experts (global)                                  P   ranks in the EP group
    L   experts per rank (E/P)                            S   metadata slots per row, min(topk, L)
    M   metadata columns per row (2*S: S probs, then S local expert ids, -1 = empty slot)
    R   rows this rank sends (one per (token, destination rank)), grouped by destination rank
    Q   rows this rank receives, grouped by source rank
    N   (received row, local expert) pairs, grouped by local expert = the experts' input rows
    C   columns of the count table exchanged before the rows (1 + L)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def meta_dtype(probs_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-row metadata: the probs dtype promoted to at least fp32, so local expert
    ids (< 2**24) are exact and fp32/fp64 router probs travel unrounded (bf16 probs upcast
    exactly)."""
    return torch.promote_types(probs_dtype, torch.float32)


@dataclass(frozen=True)
class SendRows:
    """What a rank sends in the dispatch all-to-all (output of :func:`build_send_rows`).

    Attributes:
        token_idx_R: ``[R]`` int64, source token of each row; rows grouped by destination rank,
            token order inside a group.
        meta_RM: ``[R, 2S]`` :func:`meta_dtype` of probs; slot probs then slot local expert ids
            (-1 for an empty slot). Differentiable w.r.t. ``probs_TE``.
        counts_PC: ``[P, 1 + L]`` int64. Column 0: rows for rank p (the dispatch input splits);
            column 1 + j: tokens this rank routes to rank p's local expert j.
        max_experts_per_row: 0-dim int64, the most local experts any row carries (must be <= S).
        routed_tokens: 0-dim int64, tokens with at least one expert (padding may route too).
    """

    token_idx_R: torch.Tensor
    meta_RM: torch.Tensor
    counts_PC: torch.Tensor
    max_experts_per_row: torch.Tensor
    routed_tokens: torch.Tensor


def build_send_rows(
    routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, ep_size: int, num_slots: int
) -> SendRows:
    """Steps 1-2 of dispatch: destination ranks per token, one row per (token, rank) + metadata.

    Args:
        routing_map_TE: ``[T, E]`` bool, Megatron's routing map.
        probs_TE: ``[T, E]`` float, Megatron's dense probs (only routed entries are read).
        ep_size: P; E must be divisible by P.
        num_slots: S, metadata slots per row (``min(topk, E/P)``); rows carrying more experts
            are reported through ``max_experts_per_row`` (the caller must reject them).

    Returns:
        :class:`SendRows` on the routing map's device. No communication, no host sync.
    """
    T, E = routing_map_TE.shape
    L = E // ep_size
    routing_map_TPL = routing_map_TE.view(T, ep_size, L)
    # 1. Destination ranks per token: rank p is a destination if any of its L experts is routed.
    rank_mask_PT = routing_map_TPL.any(dim=2).T
    # 2. One row per (destination rank, token), rank-major so each rank's rows are contiguous.
    rank_R, token_idx_R = rank_mask_PT.nonzero(as_tuple=True)
    local_map_RL = routing_map_TPL[token_idx_R, rank_R]  # [R, L] bool
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
    meta_RM = torch.cat([slot_probs_RS, slot_ids_RS], dim=1)
    counts_PC = torch.cat(
        [
            rank_mask_PT.sum(dim=1, keepdim=True),
            routing_map_TPL.sum(dim=0),  # [P, L] tokens per (destination rank, local expert)
        ],
        dim=1,
    ).long()
    experts_per_row_R = local_map_RL.sum(dim=1)
    no_rows = experts_per_row_R.new_zeros(1)  # max() of an empty tensor raises
    return SendRows(
        token_idx_R=token_idx_R,
        meta_RM=meta_RM,
        counts_PC=counts_PC,
        max_experts_per_row=torch.cat([experts_per_row_R, no_rows]).max(),
        routed_tokens=rank_mask_PT.any(dim=0).sum(),
    )


@dataclass(frozen=True)
class ExpandedRows:
    """Received rows expanded to (row, local expert) pairs, grouped by local expert (step 4).

    Attributes:
        row_idx_N: ``[N]`` int64, received row feeding each expert input row. Inside one local
            expert, rows keep source-rank-then-token order: the order Megatron's alltoall gives.
        probs_N: ``[N]`` probs dtype of the metadata, differentiable w.r.t. ``meta_QM``.
        tokens_per_expert_L: ``[L]`` int64 on the rows' device.
    """

    row_idx_N: torch.Tensor
    probs_N: torch.Tensor
    tokens_per_expert_L: torch.Tensor


def expand_rows(meta_QM: torch.Tensor, num_local_experts: int) -> ExpandedRows:
    """Step 4 (receiving rank): one expert-input row per (received row, routed local expert).

    Args:
        meta_QM: ``[Q, 2S]`` received metadata (slot probs, slot local expert ids, -1 empty).
        num_local_experts: L.

    Returns:
        :class:`ExpandedRows`; no communication. ``x_QH.index_select(0, row_idx_N)`` gives the
        experts' input.
    """
    S = meta_QM.shape[1] // 2
    probs_QS, ids_QS = meta_QM[:, :S], meta_QM[:, S:].detach().long()
    # Row-major enumeration of used slots (row q, then slot) ...
    row_idx_U, slot_U = (ids_QS >= 0).nonzero(as_tuple=True)
    expert_U = ids_QS[row_idx_U, slot_U]
    # ... then a stable sort by local expert keeps row order inside each expert.
    expert_N, order_N = expert_U.sort(stable=True)
    row_idx_N = row_idx_U[order_N]
    probs_N = probs_QS[row_idx_N, slot_U[order_N]]
    tokens_per_expert_L = torch.bincount(expert_N, minlength=num_local_experts)
    return ExpandedRows(row_idx_N, probs_N, tokens_per_expert_L)


def precombine_rows(y_NH: torch.Tensor, row_idx_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Step 5 (receiving rank): sum the (already prob-weighted) expert outputs of each received row
    into one row, so the combine all-to-all ships as many rows as dispatch did.

    Args:
        y_NH: ``[N, H]`` expert outputs, grouped by local expert (the order of ``row_idx_N``).
        row_idx_N: ``[N]`` int64 from :func:`expand_rows`.
        num_rows: Q, rows received in dispatch.

    Returns:
        ``[Q, H]`` same dtype/device as ``y_NH`` (summed in that dtype, like Megatron's
        unpermute). Differentiable; no communication.
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
        ``[T, H]``; tokens with no expert get zeros. Differentiable; no communication.
    """
    out_TH = y_RH.new_zeros((num_tokens, y_RH.shape[1]))
    return out_TH.index_add(0, token_idx_R, y_RH)
