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

Host syncs: one per forward (the copy of the exchanged count table, in ``token_dispatch`` at the
EP all-to-all as in Megatron's alltoall, not in ``dispatch_preprocess``), none in backward;
see ``docs/hot_path.md`` for the budget and the test that counts them.

Shape suffixes: the ``comm/`` legend (``megatron_c2r/comm/__init__.py``): T tokens, H hidden,
E experts, P EP ranks, L local experts, S slots, M = 2S metadata columns, R rows sent, Q rows
received, N expert input rows, C count columns.
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core import utils
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_c2r import compat
from megatron_c2r.comm import (
    CommStats,
    all_to_all_pair,
    all_to_all_single,
    build_send_rows,
    combine_rows,
    count_send_rows,
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
    Not supported: CUDA graphs that capture the MoE layer (its split sizes are data-dependent
    host values read once per forward, which a captured graph would freeze).
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
    if config.moe_pad_expert_input_to_capacity:
        raise ValueError(
            "moe_pad_expert_input_to_capacity=True (pad-to-capacity) is not supported by the "
            f"dedup dispatcher; set moe_pad_expert_input_to_capacity=False {alt}"
        )
    padding = compat.router_padding_flag(config)
    if padding is not None:
        raise ValueError(
            f"{padding}=True is not supported by the dedup dispatcher; set {padding}=False {alt}"
        )
    if config.moe_shared_expert_overlap:
        raise ValueError(
            "moe_shared_expert_overlap=True is not supported by the dedup dispatcher; set "
            "moe_shared_expert_overlap=False (shared experts still run, in the MoE layer) "
            f"{alt}"
        )
    graphed = compat.moe_cuda_graph_capture(config)
    if graphed is not None:
        raise ValueError(
            f"{graphed} captures the MoE layer in a CUDA graph, but the dedup dispatcher's split "
            "sizes are data-dependent host values; set cuda_graph_impl='none' or graph only "
            f"attn/mlp/mamba scopes, {alt}"
        )


def check_local_experts(
    local_expert_indices: List[int],
    num_local_experts: int,
    num_experts: int,
    ep_rank: int,
    ep_size: int,
) -> None:
    """Our dispatchers need Megatron's contiguous blocks (EP rank r owns [r*L, (r+1)*L)): a
    placement moves experts by relabelling them, never by scattering a rank's ids. One-line
    ValueError otherwise. Pure."""
    first = ep_rank * num_local_experts
    expected = list(range(first, first + num_local_experts))
    if num_local_experts * ep_size != num_experts or list(local_expert_indices) != expected:
        raise ValueError(
            f"local_expert_indices={list(local_expert_indices)} must be the contiguous block "
            f"{expected[0]}..{expected[-1]} of EP rank {ep_rank} (num_moe_experts={num_experts}, "
            f"EP={ep_size}); relabel experts instead of placing them non-contiguously"
        )


class DedupDispatcherBase(MoETokenDispatcher):
    """What the flat and the two-level dedup dispatchers share: construction checks, the input
    checks of ``dispatch_preprocess``, the one-line non-finite-logits error and pre-combine.

    Args (both subclasses):
        num_local_experts: L = E / P.
        local_expert_indices: the L consecutive global ids this rank owns (Megatron's
            contiguous blocks: rank r owns [r*L, (r+1)*L)).
        config: the layer's ``TransformerConfig``, checked by :func:`validate_dedup_config`
            unless ``config_validated`` (``C2RMoELayer`` checks it before building anything).
        pg_collection: Megatron process groups; ``None`` -> ``compat.get_default_pg_collection()``.
            Only ``pg_collection.ep`` carries traffic.

    Attributes: ``pg_collection`` (``None`` resolved), ``comm_stats`` / ``last_stats``
    (:attr:`stats_class` records), ``finite_check_router`` (see the subclasses). Construction
    runs no collective. Not a dispatcher by itself: subclasses implement the six stages and
    define ``num_slots``.
    """

    stats_class: type = CommStats  # what comm_stats and last_stats record
    dispatcher_name = "dedup"  # which dispatcher found non-finite logits, in the error

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config,
        pg_collection=None,
        *,
        config_validated: bool = False,
    ) -> None:
        if pg_collection is None:
            pg_collection = compat.get_default_pg_collection()
        ep_size = utils.get_pg_size(pg_collection.ep)
        if not config_validated:
            validate_dedup_config(config, ep_size, utils.get_pg_size(pg_collection.expt_tp))
        super().__init__(config=config, pg_collection=pg_collection)
        self.pg_collection = pg_collection
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        check_local_experts(
            local_expert_indices, num_local_experts, config.num_moe_experts, self.ep_rank, ep_size
        )
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.comm_stats = self.stats_class()
        self.last_stats = self.stats_class()
        self.finite_check_router = None

    def _flat_tokens(self, hidden_states, routing_map, probs) -> torch.Tensor:
        """``hidden_states`` as ``[T, H]`` after one-line checks of the router's outputs
        (``routing_map`` bool ``[T, E]``, ``probs`` ``[T, E]``); records the input shape, the
        probs dtype and T for the later stages. No host sync (shapes and dtypes only)."""
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
        return x_TH

    def _raise_if_not_finite(self, source_ranks: List[int]) -> None:
        """The router's one-line error (or ours without a deferring router) when the count
        exchange says the logits of ``source_ranks`` were not finite; the host list is the same
        on every EP rank, so all raise together."""
        if not source_ranks:
            return
        where = (
            f"on EP rank(s) {source_ranks} (c2r.check_finite_logits, found in the "
            f"{self.dispatcher_name} dispatcher's count exchange)"
        )
        router = self.finite_check_router
        if router is not None:
            raise router.nonfinite_logits_error(where)
        raise ValueError(f"router logits hold NaN/Inf {where}: check the input activations")

    def combine_preprocess(self, y_NH):
        """Step 5 of both data paths: pre-combine. ``[N, H]`` prob-weighted expert outputs ->
        ``[Q, H]``, one row per received row, so the return trip ships as few rows as dispatch.
        No communication."""
        return precombine_rows(y_NH, self.row_idx_N, self.num_recv_rows)


class DedupAlltoAllTokenDispatcher(DedupDispatcherBase):
    """Megatron six-stage token dispatcher that ships one row per (token, destination EP rank).

    Args: as :class:`DedupDispatcherBase`.

    Attributes:
        comm_stats: :class:`CommStats` accumulated over forward passes (rows, bytes, distinct ranks
            per token, what Megatron's alltoall would ship). The metrics owner reads and resets it.
        last_stats: the most recent forward pass's record.
        finite_check_router: a router with ``defer_finite_check = True`` (set by
            ``C2RMoELayer``): its ``logits_finite`` flag travels in the count exchange, so every
            EP rank raises the router's one-line error together instead of each router syncing.

    Host syncs (``docs/hot_path.md``): one per forward, the copy of the exchanged count table
    (split sizes must be host ints, as in Megatron's alltoall); every other size is derived from
    it. None in backward. Communication per forward: one count all-to-all on the EP group, one
    for dispatch (hidden rows and their metadata in one buffer, ``all_to_all_pair``), one for
    combine: 3 EP-wide collectives forward, 2 backward. Activation recompute of the layer
    records a second forward.
    """

    @property
    def num_slots(self) -> int:
        """S, metadata slots of a row: a token uses at most min(k, L) experts of one rank."""
        return min(self.config.moe_router_topk, self.num_local_experts)

    # ---------------------------------------------------------------------------------------
    # Dispatch
    # ---------------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Steps 1 and 3a: the count table and its exchange, on the device; no host sync.

        Args:
            hidden_states: ``[seq, batch, H]`` (or ``[T, H]``) any float dtype.
            routing_map: ``[T, E]`` bool.
            probs: ``[T, E]`` float (dense; only routed entries are read).

        Returns:
            ``x_TH`` (the tokens, ``[T, H]``) and ``probs`` (unchanged); the routing map and the
            sent and received count tables wait on ``self`` for :meth:`token_dispatch`. Side
            effect: one count all-to-all on the EP group (issued, not waited for). The host copy
            of the table comes in :meth:`token_dispatch`, where Megatron's alltoall waits for its
            split sizes too: under ``--overlap-moe-expert-parallel-comm`` this stage runs in the
            attention node, and a wait here would stall the queue before the other micro-batch's
            MLP backward is issued.
        """
        x_TH = self._flat_tokens(hidden_states, routing_map, probs)
        P = self.ep_size
        # 1. Destination ranks per token and the count table, on the device.
        counts = count_send_rows(routing_map, P)
        # 3a. Exchange [rows, tokens per local expert..., max experts per row, logits finite]
        #     per destination. Every rank sees every source's last two columns, so a bad routing
        #     map or non-finite logits raise on all ranks together instead of leaving the others
        #     waiting in the next collective.
        finite = getattr(self.finite_check_router, "logits_finite", None)
        finite = counts.counts_PC.new_ones(()) if finite is None else finite.long()
        send_PC = torch.cat(
            [counts.counts_PC, counts.max_experts_per_row.expand(P, 1), finite.expand(P, 1)],
            dim=1,
        )
        recv_PC = exchange_counts(send_PC, self.ep_group)
        self._pending = (routing_map, counts, send_PC, recv_PC)
        return x_TH, probs

    def _rows_from_counts(self, x_TH, probs):
        """Step 3b's host half: the one device->host copy of the forward (the exchanged count
        table), the checks on it, every split size, and step 2's rows sized from it."""
        routing_map, counts, send_PC, recv_PC = self._pending
        self._pending = None
        T, P, L = x_TH.shape[0], self.ep_size, self.num_local_experts
        # The one device->host sync of the layer: every size below comes from this copy.
        host = torch.cat([send_PC.flatten(), recv_PC.flatten(), counts.routed_tokens.view(1)])
        host = host.cpu()
        send_host_PC, recv_host_PC = host[:-1].view(2, P, L + 3).unbind(0)
        self._raise_on_bad_sources(recv_host_PC)
        self.input_splits = send_host_PC[:, 0].tolist()
        self.output_splits = recv_host_PC[:, 0].tolist()
        # Tokens per local expert = what every source routes to our experts; host int64 [L], as
        # Megatron's experts expect.
        self.tokens_per_expert = recv_host_PC[:, 1 : 1 + L].sum(dim=0)
        self.num_expert_rows = int(self.tokens_per_expert.sum())  # N, for expand_rows
        # 2. One row per (token, destination rank), sized from the host table (no sync).
        send = build_send_rows(
            routing_map, probs, P, self.num_slots, counts=counts, num_rows=sum(self.input_splits)
        )
        self.token_idx_R = send.token_idx_R
        self.last_stats = stats_from_counts(
            send_host_PC[:, : 1 + L].tolist(),
            recv_host_PC[:, : 1 + L].tolist(),
            rank=self.ep_rank,
            tokens=T,
            routed_tokens=int(host[-1]),
            hidden_bytes_per_row=x_TH.shape[1] * x_TH.element_size(),
            meta_bytes_per_row=send.meta_RM.shape[1] * send.meta_RM.element_size(),
            prob_bytes=probs.element_size(),
        )
        if not compat.in_backward():  # activation recompute's second forward: counted once
            self.comm_stats.record(self.last_stats)
        return x_TH.index_select(0, send.token_idx_R), send.meta_RM

    def _raise_on_bad_sources(self, recv_host_PC: torch.Tensor) -> None:
        """One-line errors from the host copy of the received table (the same on every rank)."""
        # Host tensor: no sync.
        self._raise_if_not_finite((recv_host_PC[:, -1] == 0).nonzero().flatten().tolist())
        worst = int(recv_host_PC[:, -2].max())
        if worst > self.num_slots:
            raise ValueError(
                f"routing_map routes a token to {worst} experts of one EP rank but "
                f"moe_router_topk={self.config.moe_router_topk} allows {self.num_slots}; "
                f"the router must select at most moe_router_topk experts per token"
            )

    def token_dispatch(self, x_TH, probs):
        """Steps 2 and 3b: the host copy of the exchanged count table (the forward's one host
        sync, here at the EP all-to-all as in Megatron's alltoall), the rows and metadata sized
        from it, shipped to their destination ranks (EP all-to-all).

        Args: what :meth:`dispatch_preprocess` returned. Returns ``x_QH`` and ``meta_QM``
        (slot probs and slot local expert ids, :func:`meta_dtype` of probs), grouped by source
        rank. Collective on the EP group; records ``comm_stats``; raises (on every EP rank
        alike) if any rank's router logits were not finite or a routing map gives a token more
        experts on one rank than ``moe_router_topk`` allows, before any row moves.
        """
        x_RH, meta_RM = self._rows_from_counts(x_TH, probs)
        # Rows and their metadata side by side in one all-to-all (one collective each way).
        return all_to_all_pair(x_RH, meta_RM, self.output_splits, self.input_splits, self.ep_group)

    def dispatch_postprocess(self, x_QH, meta_QM):
        """Step 4: expand each received row to its local experts, grouped by local expert.

        Returns:
            ``x_NH`` (expert inputs), ``tokens_per_expert`` (``[L]`` int64 on the host) and
            ``probs_N`` (in the router's probs dtype) -- the triple Megatron's experts take.
            No communication, no host sync (N comes from the count table).
        """
        expanded = expand_rows(meta_QM, self.num_local_experts, self.num_expert_rows)
        self.row_idx_N = expanded.row_idx_N
        self.num_recv_rows = x_QH.shape[0]
        x_NH = x_QH.index_select(0, expanded.row_idx_N)
        return x_NH, self.tokens_per_expert, expanded.probs_N.to(self.probs_dtype)

    # ---------------------------------------------------------------------------------------
    # Combine
    # ---------------------------------------------------------------------------------------
    def token_combine(self, y_QH):
        """Step 6a: send each row back to its source rank (EP all-to-all, splits swapped).
        Returns ``[R, H]`` in the order this rank sent them."""
        return all_to_all_single(y_QH, self.input_splits, self.output_splits, self.ep_group)

    def combine_postprocess(self, y_RH):
        """Step 6b: sum each token's returned rows; reshape to the input's ``[seq, batch, H]``."""
        out_TH = combine_rows(y_RH, self.token_idx_R, self.num_tokens)
        return out_TH.view(self.hidden_shape)
