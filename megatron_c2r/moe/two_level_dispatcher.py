"""Two-level de-duplicating token dispatcher: one copy of a token per destination *node* crosses
the inter-node link, then one copy per destination *rank* inside the node (DeepEP's pattern).

The flat dedup dispatcher (``dispatcher.py``) ships one row per (token, destination rank); across
nodes a token whose experts sit on three ranks of one remote node crosses InfiniBand three times.
Here it crosses once, to the rank with the same local index on that node (its rail peer), which
relays it over NVLink to the ranks holding its experts. Rows for the token's own node skip the
inter-node hop: the source relays them itself.

Data path (numbered as in ``megatron_c2r/comm/two_level.py``):
    0. count table per destination (node rows, rank rows, tokens per expert) -> one all-to-all of
       P*C ints over the EP group -> one host sync: every split size of both hops
    1. source: one node row per (token, destination node) with that node's expert slots
    2. hop 1 (inter-node): node rows to the rail peers on other nodes
    3. relay: one rank row per (node row, rank of its node) with that rank's slots
    4. hop 2 (intra-node): rank rows to the ranks of the node; expand to (row, local expert)
    5. experts; pre-combine per rank row; hop 2 back; the relay sums a node row's rank rows
    6. hop 1 back; the source sums a token's node rows
Backward mirrors it through the autograd all-to-all (splits swapped) and index ops: no host sync.

Process groups (design choice): each hop is an ``all_to_all_single`` over the EP group itself,
with zero-size splits to the peers a rank does not talk to on that hop, instead of rail and node
subgroups. Subgroups must be created collectively over the whole world, in the same order on every
rank including other pipeline stages, i.e. inside Megatron's ``initialize_model_parallel`` which we
do not own, and each NCCL communicator costs memory and init time per EP group. The EP group
already connects every pair of ranks (the flat dispatcher and Megatron's alltoall use it), runs on
gloo and NCCL alike, and the payload on each link is the same. The cost: with NCCL >= 2.14
PyTorch still posts a zero-byte ncclSend/ncclRecv to every idle peer (to keep the group call
matched across ranks), i.e. per-peer launch and proxy work on a P-wide group instead of an N- or
G-wide one. That is latency, not bandwidth, and it is what rail/node groups would remove at scale;
the hops go through :meth:`TwoLevelDedupTokenDispatcher._hop` only, so such groups can be passed
in later without touching the row logic.

Experts receive what Megatron's alltoall hands them: rows grouped by local expert, source rank
then token inside an expert, ``tokens_per_expert`` on the host, probs in the router's dtype.

Shape suffixes: the ``comm/`` legend plus the two-level letters of ``comm/two_level.py``
(D nodes, G ranks per node, V node slots, A = 2V and W = 2S + 1 metadata columns, B node rows).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from megatron.core import utils
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_c2r import compat
from megatron_c2r.comm import all_to_all_pair, all_to_all_single, combine_rows, exchange_counts, precombine_rows
from megatron_c2r.comm.topology import NodeTopology, discover_topology
from megatron_c2r.comm.two_level import (
    TwoLevelCommStats,
    build_count_table,
    build_node_rows,
    build_rank_rows,
    expand_rank_rows,
    plan_hops,
    two_level_stats,
)
from megatron_c2r.moe.dispatcher import DedupAlltoAllTokenDispatcher, DedupDispatcherBase
from megatron_c2r.moe.options import HIERARCHIES  # c2r.hierarchy values (the one list)


class TwoLevelDedupTokenDispatcher(DedupDispatcherBase):
    """Megatron six-stage token dispatcher shipping one row per (token, destination node) across
    nodes and one per (token, destination rank) inside a node.

    Args:
        num_local_experts, local_expert_indices, config, pg_collection, config_validated: as
            :class:`~megatron_c2r.moe.dispatcher.DedupDispatcherBase` (forwarded to it).
        topology: the EP group's :class:`NodeTopology`; ``None`` -> :func:`discover_topology`
            (one all-gather over the EP group at construction, or none with ``gpus_per_node``).
        gpus_per_node: simulate nodes of this many consecutive global ranks (tests, CPU).

    Attributes:
        comm_stats: :class:`TwoLevelCommStats` accumulated over forward passes (the metrics
            owner reads and resets it); ``last_stats``: the latest forward's record;
            ``plan``: the latest :class:`~megatron_c2r.comm.two_level.HopPlan` (per-peer splits).
        finite_check_router: as in the flat dispatcher: a router with ``defer_finite_check``
            whose ``logits_finite`` flag travels in the count exchange (set by the layer).

    Per forward: one count all-to-all, one blocking host sync (the count table), then one
    all-to-all per hop for dispatch (hidden rows and their metadata in one buffer) and one per
    hop for combine: 5 EP-wide collectives forward, 4 backward (two hops each way plus the
    count table is the floor; the flat dispatcher: 3 and 2).
    """

    stats_class = TwoLevelCommStats
    dispatcher_name = "two-level"

    def __init__(
        self,
        *args,
        topology: Optional[NodeTopology] = None,
        gpus_per_node: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if topology is None:
            topology = discover_topology(
                self.ep_group,
                gpus_per_node=gpus_per_node,
                parallel_sizes=parallel_sizes(self.config, self.pg_collection),
            )
        if (topology.ep_size, topology.rank) != (self.ep_size, self.ep_rank):
            raise ValueError(
                f"topology (ep_size={topology.ep_size}, rank={topology.rank}) does not describe "
                f"this EP group (size {self.ep_size}, rank {self.ep_rank}); build it on this group"
            )
        self.topology = topology
        k, G, L = self.config.moe_router_topk, topology.ranks_per_node, self.num_local_experts
        self.num_slots = (min(k, G * L), min(k, L))  # (V, S)
        self.plan = None

    def _hop(self, x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int]):
        """One hop's all-to-all over the EP group (zero splits for peers off this hop).
        Differentiable; collective on the EP group."""
        return all_to_all_single(x, output_splits, input_splits, self.ep_group)

    def _hop_pair(self, x, meta, output_splits: Sequence[int], input_splits: Sequence[int]):
        """One hop's rows and their metadata in ONE all-to-all over the EP group (bytes side by
        side, ``all_to_all_pair``). Differentiable in both; collective on the EP group."""
        return all_to_all_pair(x, meta, output_splits, input_splits, self.ep_group)

    # ---------------------------------------------------------------------------------------
    # Dispatch
    # ---------------------------------------------------------------------------------------
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Step 0a: the count table and its exchange, on the device; no host sync.

        Args:
            hidden_states: ``[S, B, H]`` (or ``[T, H]``), any float dtype.
            routing_map: ``[T, E]`` bool. probs: ``[T, E]`` float (routed entries read).

        Returns:
            ``x_TH`` and ``probs`` (unchanged); the routing map and both count tables wait on
            ``self`` for :meth:`token_dispatch`, which makes the forward's one host copy at the
            EP all-to-all, as Megatron's alltoall does (see the flat dispatcher). Side effect:
            one count all-to-all on the EP group.
        """
        x_TH = self._flat_tokens(hidden_states, routing_map, probs)
        # 0. Count table (with the router's deferred finite-logits flag) -> exchange. Every rank
        #    sees every source's flag and worst row, so bad input raises on all ranks together,
        #    before any row moves.
        finite = getattr(self.finite_check_router, "logits_finite", None)
        table = build_count_table(routing_map, self.topology, finite)
        recv_PC = exchange_counts(table.counts_PC, self.ep_group)
        self._pending = (routing_map, table, recv_PC)
        return x_TH, probs

    def _node_rows(self, x_TH, probs):
        """Steps 0b-1: the one device->host copy of the forward (both count tables), the hop
        plan and its checks, then the node rows: own node first (they skip hop 1), then by
        destination node. Records ``comm_stats``."""
        routing_map, table, recv_PC = self._pending
        self._pending = None
        T, topo, P = x_TH.shape[0], self.topology, self.ep_size
        C = table.counts_PC.shape[1]
        host = torch.cat(
            [table.counts_PC.flatten(), recv_PC.flatten(), table.routed_tokens.view(1)]
        ).tolist()
        send_table = [host[i * C : (i + 1) * C] for i in range(P)]
        recv_table = [host[(P + i) * C : (P + i + 1) * C] for i in range(P)]
        plan = plan_hops(send_table, recv_table, topo)
        self._raise_on_bad_sources(plan)
        self.plan, self._recv_PC = plan, recv_PC
        node_rows = [row[0] for row in send_table[:: topo.ranks_per_node]]
        rows = build_node_rows(routing_map, probs, topo, self.num_slots[0], node_rows)
        self.token_idx_B = rows.token_idx_B
        self.last_stats = two_level_stats(
            plan, send_table, recv_table, topo, tokens=T, routed_tokens=host[-1],
            hidden_bytes_per_row=x_TH.shape[1] * x_TH.element_size(),
            meta_bytes_per_column=rows.meta_BA.element_size(), num_slots=self.num_slots,
            prob_bytes=probs.element_size(),
        )  # fmt: skip
        if not compat.in_backward():  # activation recompute's second forward: counted once
            self.comm_stats.record(self.last_stats)
        return x_TH.index_select(0, rows.token_idx_B), rows.meta_BA

    def _raise_on_bad_sources(self, plan) -> None:
        """One-line errors from the host plan (identical on every rank of the EP group)."""
        self._raise_if_not_finite(plan.sources_not_finite)
        if plan.max_experts_per_row > self.num_slots[0]:
            raise ValueError(
                f"routing_map routes a token to {plan.max_experts_per_row} experts but "
                f"moe_router_topk={self.config.moe_router_topk}; the router must select at "
                f"most moe_router_topk experts per token"
            )

    def token_dispatch(self, x_TH, probs):
        """Steps 0b-4a: the host copy of the count tables (the forward's one host sync, at the
        EP all-to-all as in Megatron's alltoall), the node rows, hop 1, the relay's rank rows,
        hop 2.

        Args: what :meth:`dispatch_preprocess` returned. Returns ``x_QH`` and ``meta_QW``, the
        rank rows this rank's experts receive, grouped by relay. Collective on the EP group;
        raises on every rank alike for non-finite logits or too many experts per token.
        """
        x_BH, meta_BA = self._node_rows(x_TH, probs)
        plan, topo, P = self.plan, self.topology, self.ep_size
        own, device = plan.own_rows, x_BH.device
        # 2. Hop 1: everything after the own-node rows goes to the rail peers.
        x_Q1H, meta_Q1A = self._hop_pair(x_BH[own:], meta_BA[own:], plan.hop1_recv, plan.hop1_send)
        # 3. Relay. Source rank of every node row, from the device copy of the received table
        #    (repeat_interleave with a known output size does not sync).
        ranks_P = torch.arange(P, device=device)
        remote_rail_P = (ranks_P % topo.ranks_per_node == topo.local_index) & (
            ranks_P // topo.ranks_per_node != topo.node
        )
        hop1_recv_P = torch.where(remote_rail_P, self._recv_PC[:, 0], 0)
        src_B = torch.cat(
            [
                torch.full((own,), topo.rank, dtype=torch.long, device=device),
                torch.repeat_interleave(ranks_P, hop1_recv_P, output_size=sum(plan.hop1_recv)),
            ]
        )
        node_x_BH = torch.cat([x_BH[:own], x_Q1H])
        rank_rows = build_rank_rows(
            torch.cat([meta_BA[:own], meta_Q1A]), src_B, self.num_local_experts,
            topo.ranks_per_node, self.num_slots[1], sum(plan.hop2_send),
        )  # fmt: skip
        self.node_row_idx_R, self.num_node_rows = rank_rows.node_row_idx_R, node_x_BH.shape[0]
        # 4a. Hop 2: rank rows inside the node.
        x_RH = node_x_BH.index_select(0, rank_rows.node_row_idx_R)
        x_QH, meta_QW = self._hop_pair(x_RH, rank_rows.meta_RW, plan.hop2_recv, plan.hop2_send)
        return x_QH, meta_QW

    def dispatch_postprocess(self, x_QH, meta_QW):
        """Step 4b: expand rank rows to their local experts, grouped by local expert.

        Returns ``x_NH``, ``tokens_per_expert`` (``[L]`` int64 on the host) and ``probs_N`` (the
        router's probs dtype): the triple Megatron's experts take. No communication, no sync.
        """
        tokens_per_expert = self.plan.tokens_per_expert
        self.row_idx_N, probs_N = expand_rank_rows(
            meta_QW, self.num_local_experts, self.ep_size, sum(tokens_per_expert)
        )
        self.num_recv_rows = x_QH.shape[0]
        x_NH = x_QH.index_select(0, self.row_idx_N)
        tokens_per_expert = torch.tensor(tokens_per_expert, dtype=torch.long)  # host, as Megatron
        return x_NH, tokens_per_expert, probs_N.to(self.probs_dtype)

    # ---------------------------------------------------------------------------------------
    # Combine
    # ---------------------------------------------------------------------------------------
    def token_combine(self, y_QH):
        """Steps 5b-6a: hop 2 back, the relay sums each node row's rank rows, hop 1 back.
        Returns ``[B, H]`` in the order :meth:`token_dispatch` built the node rows."""
        plan = self.plan
        y_RH = self._hop(y_QH, plan.hop2_send, plan.hop2_recv)
        node_y_BH = precombine_rows(y_RH, self.node_row_idx_R, self.num_node_rows)
        own = plan.own_rows
        y_R1H = self._hop(node_y_BH[own:], plan.hop1_send, plan.hop1_recv)
        return torch.cat([node_y_BH[:own], y_R1H])

    def combine_postprocess(self, y_BH):
        """Step 6b: sum each token's node rows; reshape to the input's ``[S, B, H]``."""
        return combine_rows(y_BH, self.token_idx_B, self.num_tokens).view(self.hidden_shape)


def parallel_sizes(config, pg_collection) -> dict:
    """The parallel sizes a node-layout error names (pure reads)."""
    return dict(
        tensor_model_parallel_size=getattr(config, "tensor_model_parallel_size", 1),
        expert_model_parallel_size=utils.get_pg_size(pg_collection.ep),
        expert_tensor_parallel_size=utils.get_pg_size(pg_collection.expt_tp),
    )


def check_hierarchy(hierarchy: str) -> None:
    """One-line error unless ``hierarchy`` is one of :data:`HIERARCHIES`."""
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"c2r.hierarchy={hierarchy!r} must be one of {', '.join(HIERARCHIES)}")


def select_dispatcher_class(hierarchy: str, topology: Optional[NodeTopology]) -> type:
    """The dedup dispatcher class for ``c2r.hierarchy``: ``flat`` ->
    :class:`DedupAlltoAllTokenDispatcher`, ``two_level`` -> :class:`TwoLevelDedupTokenDispatcher`,
    ``auto`` -> two-level iff ``topology`` spans more than one node. Pure."""
    check_hierarchy(hierarchy)
    if hierarchy == "auto":
        if topology is None:
            raise ValueError("c2r.hierarchy='auto' needs the EP group's topology; pass topology")
        hierarchy = "two_level" if topology.is_multi_node else "flat"
    if hierarchy == "two_level":
        return TwoLevelDedupTokenDispatcher
    return DedupAlltoAllTokenDispatcher


def build_dedup_dispatcher(
    num_local_experts: int,
    local_expert_indices: List[int],
    config,
    pg_collection=None,
    *,
    hierarchy: str = "auto",
    gpus_per_node: Optional[int] = None,
    topology: Optional[NodeTopology] = None,
    config_validated: bool = False,
) -> MoETokenDispatcher:
    """The dedup dispatcher ``C2RMoELayer`` should install for ``c2r.hierarchy``.

    ``flat`` builds the flat dispatcher without any collective; ``auto`` and ``two_level``
    learn the topology first (one all-gather over the EP group unless ``topology`` or
    ``gpus_per_node`` is given). Every rank of the EP group must call it together, as it
    builds the same layers in the same order.
    """
    check_hierarchy(hierarchy)  # before any collective
    if pg_collection is None:
        pg_collection = compat.get_default_pg_collection()
    if hierarchy != "flat" and topology is None:
        topology = discover_topology(
            pg_collection.ep,
            gpus_per_node=gpus_per_node,
            parallel_sizes=parallel_sizes(config, pg_collection),
        )
    cls = select_dispatcher_class(hierarchy, topology)
    extra = {} if cls is DedupAlltoAllTokenDispatcher else dict(topology=topology)
    return cls(
        num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection,
        config_validated=config_validated, **extra,
    )  # fmt: skip
