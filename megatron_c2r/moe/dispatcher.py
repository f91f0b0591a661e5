"""De-duplicating all-to-all token dispatcher: one copy of a token per destination EP rank.

Megatron's ``MoEAlltoAllTokenDispatcher`` ships one row per (token, selected expert), so a token
whose k experts sit on one rank crosses the network k times. This dispatcher ships one row per
(token, destination rank) with that rank's local expert ids and probs as metadata, expands rows to
the local experts on arrival, and sums a row's expert outputs before sending it back. Routing
locality (C2R, group-limited routing, collaboration-aware placement) then turns into fewer bytes.

Data path (the numbered steps recur in the stage methods below):
    1. destination ranks per token from ``routing_map`` and the expert->rank blocks
    2. send buffer: one row per (token, destination rank), grouped by rank, + per-row metadata
    3. exchange counts, then rows and metadata (``all_to_all_single``, explicit splits)
    4. receiving rank: expand rows to (row, local expert), grouped by local expert -> experts
    5. pre-combine: sum the weighted outputs of one row's experts into one row
    6. send one row per (token, rank) back; the source rank sums them into the token
Backward mirrors it: the autograd all-to-all ships gradients with swapped splits, and index ops
route them to hidden states, metadata probs (hence the router) and expert weights.

The experts receive exactly what Megatron's alltoall hands them (rows grouped by local expert,
source-rank-then-token order inside an expert, ``tokens_per_expert`` on the host, permuted probs
in the probs dtype), so SequentialMLP, GroupedMLP and TEGroupedMLP work unchanged.

Legend for shape suffixes (see ``megatron_c2r/comm/rows.py``): T tokens, H hidden, E experts,
P EP ranks, L local experts, S slots, M = 2S metadata columns, R rows sent, Q rows received,
N expert input rows, C count columns.
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core import utils
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_c2r import compat
from megatron_c2r.comm import (
    CommStats,
    all_to_all_single,
    build_send_rows,
    combine_rows,
    exchange_counts,
    expand_rows,
    precombine_rows,
    stats_from_counts,
)


def validate_dedup_config(config, ep_size: int, expert_tp_size: int) -> None:
    """Reject configurations the dedup dispatcher does not implement, with a one-line error
    naming the field, its value and the fix. Pure: reads ``config`` attributes only.

    Supported: any EP size dividing ``num_moe_experts``, dropless routing and capacity-factor
    dropping without padding (both are just a routing map), shared experts computed by the MoE
    layer, fp32/bf16/fp16. With expert TP 1 the dispatcher talks only to the EP group, as
    Megatron's alltoall does, so attention TP (with sequence parallel) needs nothing extra here.
    """
    alt = "or build the layer with dispatcher='megatron'"
    if expert_tp_size != 1:
        raise ValueError(
            f"expert_tensor_parallel_size={expert_tp_size} is not supported by the dedup "
            f"dispatcher; set expert_tensor_parallel_size=1 {alt}"
        )
    experts, topk = config.num_moe_experts, config.moe_router_topk
    if not experts or experts % ep_size != 0:
        raise ValueError(
            f"num_moe_experts={experts} must be a positive multiple of "
            f"expert_model_parallel_size={ep_size}; change either"
        )
    if not topk or topk < 1 or topk > experts:
        raise ValueError(f"moe_router_topk={topk} must be in [1, num_moe_experts={experts}]")
    if getattr(config, "moe_pad_expert_input_to_capacity", False):
        raise ValueError(
            "moe_pad_expert_input_to_capacity=True (pad-to-capacity) is not supported by the "
            f"dedup dispatcher; set moe_pad_expert_input_to_capacity=False {alt}"
        )
    if getattr(config, "moe_router_padding_for_quantization", False):
        raise ValueError(
            "moe_router_padding_for_quantization=True is not supported by the dedup dispatcher; "
            f"set moe_router_padding_for_quantization=False {alt}"
        )
    if getattr(config, "moe_shared_expert_overlap", False):
        raise ValueError(
            "moe_shared_expert_overlap=True is not supported by the dedup dispatcher; set "
            "moe_shared_expert_overlap=False (shared experts still run, in the MoE layer) "
            f"{alt}"
        )
    graph_impl = getattr(config, "cuda_graph_impl", "none")
    scopes = getattr(config, "cuda_graph_scope", None) or []
    scopes = scopes if isinstance(scopes, (list, tuple)) else [scopes]
    moe_scopes = [str(s) for s in scopes if "moe" in str(s)]
    if graph_impl != "none" and moe_scopes:
        raise ValueError(
            f"cuda_graph_scope={moe_scopes} captures the MoE dispatcher, whose split sizes are "
            f"data-dependent host values; drop the moe scopes from cuda_graph_scope {alt}"
        )


class DedupAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Megatron six-stage token dispatcher that ships one row per (token, destination EP rank).

    Args:
        num_local_experts: L = E / P.
        local_expert_indices: the L consecutive global ids this rank owns (Megatron's
            contiguous blocks: rank r owns [r*L, (r+1)*L)).
        config: the layer's ``TransformerConfig`` (validated by :func:`validate_dedup_config`).
        pg_collection: Megatron process groups; ``None`` -> ``compat.get_default_pg_collection()``.
            Only ``pg_collection.ep`` carries traffic.

    Attributes:
        comm_stats: :class:`CommStats` accumulated over forward passes (rows, bytes, distinct ranks
            per token, what Megatron's alltoall would ship). The metrics owner reads and resets it.
        last_stats: the most recent forward pass's record.

    Each forward does one small count all-to-all and one host sync (split sizes must be host
    ints, as in Megatron's alltoall), then two all-to-alls for dispatch (hidden rows, metadata)
    and one for combine. Activation recompute of the layer records a second forward.
    """

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config,
        pg_collection=None,
    ) -> None:
        if pg_collection is None:
            pg_collection = compat.get_default_pg_collection()
        ep_size = utils.get_pg_size(pg_collection.ep)
        validate_dedup_config(config, ep_size, utils.get_pg_size(pg_collection.expt_tp))
        super().__init__(config=config, pg_collection=pg_collection)
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        first = self.ep_rank * num_local_experts
        expected = list(range(first, first + num_local_experts))
        if (
            num_local_experts * ep_size != config.num_moe_experts
            or list(local_expert_indices) != expected
        ):
            raise ValueError(
                f"local_expert_indices={list(local_expert_indices)} must be the contiguous block "
                f"{expected[0]}..{expected[-1]} of EP rank {self.ep_rank} "
                f"(num_moe_experts={config.num_moe_experts}, EP={ep_size}); relabel experts "
                f"instead of placing them non-contiguously"
            )
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.num_slots = min(config.moe_router_topk, num_local_experts)  # S
        self.comm_stats = CommStats()
        self.last_stats = CommStats()

    # ---------------------------------------------------------------------------------------
    # Dispatch
    # ---------------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Steps 1-3a: rows per (token, destination rank), their metadata, and split sizes.

        Args:
            hidden_states: ``[S, B, H]`` (or ``[T, H]``) any float dtype.
            routing_map: ``[T, E]`` bool.
            probs: ``[T, E]`` float (dense; only routed entries are read).

        Returns:
            ``x_RH`` (rows grouped by destination rank, hidden dtype) and ``meta_RM`` (slot probs
            and slot local expert ids, :func:`meta_dtype` of probs). Side effects: one count
            all-to-all on the EP group, one host sync, records ``comm_stats``.
        """
        self.hidden_shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_shape[-1])
        T = x_TH.shape[0]
        if routing_map.dtype != torch.bool or tuple(routing_map.shape) != (T, self.num_experts):
            raise ValueError(
                f"routing_map must be bool [tokens={T}, num_moe_experts={self.num_experts}], got "
                f"{routing_map.dtype} {list(routing_map.shape)}; pass the router's routing_map"
            )
        if tuple(probs.shape) != (T, self.num_experts):
            raise ValueError(
                f"probs must be [tokens={T}, num_moe_experts={self.num_experts}], got "
                f"{list(probs.shape)}; pass the router's dense probs"
            )
        self.probs_dtype, self.num_tokens = probs.dtype, T
        # 1-2. Destination ranks per token; one row per (token, rank) with its local experts.
        send = build_send_rows(routing_map, probs, self.ep_size, self.num_slots)
        self.token_idx_R = send.token_idx_R
        # 3a. Exchange per-destination counts: [rows, tokens per local expert..., max experts
        #     per row]. Every rank sees every source's max, so a bad routing map raises on all
        #     ranks together instead of leaving the others waiting in the next collective.
        max_col_P1 = send.max_experts_per_row.expand(self.ep_size, 1)
        send_counts_PC = torch.cat([send.counts_PC, max_col_P1], dim=1)
        recv_counts_PC = exchange_counts(send_counts_PC, self.ep_group)
        host = torch.cat(
            [send_counts_PC.flatten(), recv_counts_PC.flatten(), send.routed_tokens.view(1)]
        ).tolist()  # the one device->host sync of the forward pass
        C = send_counts_PC.shape[1]
        rows_of = [host[i * C : (i + 1) * C] for i in range(2 * self.ep_size)]
        send_table, recv_table = rows_of[: self.ep_size], rows_of[self.ep_size :]
        worst = max(row[-1] for row in recv_table)
        if worst > self.num_slots:
            raise ValueError(
                f"routing_map routes a token to {worst} experts of one EP rank but "
                f"moe_router_topk={self.config.moe_router_topk} allows {self.num_slots}; "
                f"the router must select at most moe_router_topk experts per token"
            )
        self.input_splits = [row[0] for row in send_table]
        self.output_splits = [row[0] for row in recv_table]
        # Tokens per local expert = sum over sources of what they route to our experts.
        self.tokens_per_expert = torch.tensor(
            [sum(row[1 + j] for row in recv_table) for j in range(self.num_local_experts)],
            dtype=torch.long,
        )  # host tensor, as Megatron's experts expect
        self.last_stats = stats_from_counts(
            [row[:-1] for row in send_table],
            [row[:-1] for row in recv_table],
            rank=self.ep_rank,
            tokens=T,
            routed_tokens=host[-1],
            hidden_bytes_per_row=x_TH.shape[1] * x_TH.element_size(),
            meta_bytes_per_row=send.meta_RM.shape[1] * send.meta_RM.element_size(),
            prob_bytes=probs.element_size(),
        )
        self.comm_stats.record(self.last_stats)
        x_RH = x_TH.index_select(0, send.token_idx_R)
        return x_RH, send.meta_RM

    def token_dispatch(self, x_RH, meta_RM):
        """Step 3b: ship rows and metadata to their destination ranks (EP all-to-all).

        Returns ``x_QH`` and ``meta_QM``, grouped by source rank. Collective on the EP group.
        """
        x_QH = all_to_all_single(x_RH, self.output_splits, self.input_splits, self.ep_group)
        meta_QM = all_to_all_single(meta_RM, self.output_splits, self.input_splits, self.ep_group)
        return x_QH, meta_QM

    def dispatch_postprocess(self, x_QH, meta_QM):
        """Step 4: expand each received row to its local experts, grouped by local expert.

        Returns:
            ``x_NH`` (expert inputs), ``tokens_per_expert`` (``[L]`` int64 on the host) and
            ``probs_N`` (in the router's probs dtype) -- the triple Megatron's experts take.
            No communication.
        """
        expanded = expand_rows(meta_QM, self.num_local_experts)
        self.row_idx_N = expanded.row_idx_N
        self.num_recv_rows = x_QH.shape[0]
        x_NH = x_QH.index_select(0, expanded.row_idx_N)
        return x_NH, self.tokens_per_expert, expanded.probs_N.to(self.probs_dtype)

    # ---------------------------------------------------------------------------------------
    # Combine
    # ---------------------------------------------------------------------------------------
    def combine_preprocess(self, y_NH):
        """Step 5: pre-combine. ``[N, H]`` prob-weighted expert outputs -> ``[Q, H]``, one row per
        received row, so the return trip ships as few rows as dispatch. No communication."""
        return precombine_rows(y_NH, self.row_idx_N, self.num_recv_rows)

    def token_combine(self, y_QH):
        """Step 6a: send each row back to its source rank (EP all-to-all, splits swapped).
        Returns ``[R, H]`` in the order this rank sent them."""
        return all_to_all_single(y_QH, self.input_splits, self.output_splits, self.ep_group)

    def combine_postprocess(self, y_RH):
        """Step 6b: sum each token's returned rows; reshape to the input's ``[S, B, H]``."""
        out_TH = combine_rows(y_RH, self.token_idx_R, self.num_tokens)
        return out_TH.view(self.hidden_shape)
