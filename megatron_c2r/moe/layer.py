"""``C2RMoELayer``: Megatron's ``MoELayer`` with a selectable token dispatcher.

Megatron picks its dispatcher from ``config.moe_token_dispatcher_type`` (allgather | alltoall |
flex) inside ``MoELayer.__init__``; there is no seam for a custom one. This subclass builds the
stock layer (router, experts, shared experts unchanged) and then replaces ``self.token_dispatcher``
when ``dispatcher="dedup"``: the flat dedup dispatcher, or the two-level one (one row per
destination node across nodes) when the EP group spans more than one node (``hierarchy``). Use it
per model through the layer spec::

    from megatron_c2r.moe.layer import TopologyMemo, c2r_moe_spec
    memo = TopologyMemo()                               # one per model build, shared by layers
    moe_spec = c2r_moe_spec(stock_moe_spec, dispatcher="dedup", hierarchy="auto", topology_memo=memo)

``dispatcher="megatron"`` keeps Megatron's own choice (the config's dispatcher type): the baseline
for A/B runs and the oracle in our tests. ``moe_layers(model)`` lists the MoE layers of a model
for the metrics owner and the relabelling code.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import utils
from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoELayer, MoESubmodules

from megatron_c2r import compat
from megatron_c2r.comm.topology import NodeTopology, discover_topology
from megatron_c2r.moe.dispatcher import validate_dedup_config
from megatron_c2r.moe.options import DISPATCHERS
from megatron_c2r.moe.two_level_dispatcher import (
    build_dedup_dispatcher,
    check_hierarchy,
    parallel_sizes,
)


class TopologyMemo:
    """The EP group's :class:`~megatron_c2r.comm.topology.NodeTopology`, learned once per model.

    ``hierarchy='auto'`` (and ``'two_level'``) must know which EP ranks share a node: one
    all-gather of a node key over the EP group. A model has one EP group per rank, so its MoE
    layers share one memo and only the first layer pays. Not global on purpose: the spec
    builders make one per block spec, so nothing survives into the next model or test (a
    re-initialised parallel state with the same ranks and ``gpus_per_node`` in the same model
    build would reuse the entry, which describes the same processes).
    """

    def __init__(self) -> None:
        self._topologies: Dict[Tuple[Tuple[int, ...], Optional[int]], NodeTopology] = {}
        self.discoveries = 0  # topologies computed (all-gathers, unless gpus_per_node is set)

    def get(self, config, pg_collection, gpus_per_node: Optional[int] = None) -> NodeTopology:
        """The topology of ``pg_collection.ep``; collective on it the first time per group
        (every rank of the group builds the same layers in the same order)."""
        group = pg_collection.ep
        ranks = tuple(dist.get_process_group_ranks(group)) if dist.is_initialized() else ()
        key = (ranks, gpus_per_node)
        if key not in self._topologies:
            self._topologies[key] = discover_topology(
                group, gpus_per_node=gpus_per_node,
                parallel_sizes=parallel_sizes(config, pg_collection),
            )  # fmt: skip
            self.discoveries += 1
        return self._topologies[key]


class C2RMoELayer(MoELayer):
    """Megatron MoE layer whose token dispatcher is ours (``"dedup"``) or Megatron's
    (``"megatron"``).

    Args:
        config: ``TransformerConfig``; with ``"dedup"`` it is validated once, before anything is
            built (see :func:`validate_dedup_config`).
        submodules: ``MoESubmodules`` (experts, shared experts, router -- any router returning
            ``(probs, routing_map)``).
        layer_number: as in ``MoELayer``.
        pg_collection: Megatron process groups. ``TransformerLayer`` passes them only to the exact
            ``MoELayer`` class, so ``None`` falls back to ``compat.get_default_pg_collection()``.
        dispatcher: ``"dedup"`` (one row per token and destination EP rank) or ``"megatron"``.
        hierarchy: ``c2r.hierarchy`` (``"dedup"`` only): ``"auto"`` -> the two-level dispatcher
            iff the EP group spans more than one node, ``"flat"`` / ``"two_level"`` force one
            (``megatron_c2r.moe.options.HIERARCHIES``).
        gpus_per_node: ``c2r.gpus_per_node``: nodes are blocks of this many consecutive global
            ranks (simulated nodes; no collective). ``None``: ask the processes (one all-gather
            over the EP group, once per ``topology_memo``). Not read with ``"flat"``.
        topology_memo: a :class:`TopologyMemo` shared by the model's MoE layers; ``None`` -> a
            fresh one (one topology per layer: one all-gather per layer under auto).
        layer_kwargs: whatever else this Megatron's ``TransformerLayer`` passes to its MLP,
            forwarded to ``MoELayer`` unchanged (which keywords exist is ``compat``'s concern).

    Side effects: like ``MoELayer``. With ``"dedup"`` and a router that can defer its
    finite-logits check (``C2RRouter.defer_finite_check``), the router's check is folded into
    the dispatcher's count exchange: the layer's one host sync (``docs/hot_path.md``), for both
    dispatcher classes. With ``"auto"``/``"two_level"`` the first layer of a memo runs one
    all-gather over the EP group (construction only). The dedup dispatcher's row/byte counters
    are at :attr:`comm_stats`; the node layout it used at :attr:`topology` (None with
    ``"flat"`` or ``"megatron"``); the process groups it was built with (``None`` resolved) at
    :attr:`pg_collection`.
    """

    def __init__(
        self,
        config,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        dispatcher: str = "dedup",
        hierarchy: str = "auto",
        gpus_per_node: Optional[int] = None,
        topology_memo: Optional[TopologyMemo] = None,
        **layer_kwargs,
    ):
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r} is not one of {DISPATCHERS}; pick one")
        check_hierarchy(hierarchy)  # before any collective
        if pg_collection is None:
            pg_collection = compat.get_default_pg_collection()
        self.dispatcher, self.pg_collection = dispatcher, pg_collection
        if dispatcher == "megatron":
            super().__init__(config, submodules, layer_number, pg_collection, **layer_kwargs)
            self.topology = None
            return
        validate_dedup_config(
            config,
            utils.get_pg_size(pg_collection.ep),
            utils.get_pg_size(pg_collection.expt_tp),
        )
        with compat.cheap_stock_dispatcher(config):
            super().__init__(config, submodules, layer_number, pg_collection, **layer_kwargs)
        self.topology = None
        if hierarchy != "flat":
            memo = topology_memo if topology_memo is not None else TopologyMemo()
            self.topology = memo.get(config, pg_collection, gpus_per_node)
            _check_router_nodes(self.router, self.topology, gpus_per_node)
        self.token_dispatcher = build_dedup_dispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            self.config,
            pg_collection,
            hierarchy=hierarchy,
            topology=self.topology,
            config_validated=True,
        )
        if hasattr(self.router, "defer_finite_check"):
            # The router records a device flag instead of syncing; either dispatcher ships it
            # with its count table and raises the router's error on every EP rank after the
            # exchange (both read ``finite_check_router``).
            self.router.defer_finite_check = True
            self.token_dispatcher.finite_check_router = self.router

    @property
    def comm_stats(self):
        """The dedup dispatcher's :class:`~megatron_c2r.comm.CommStats` (None for "megatron")."""
        return getattr(self.token_dispatcher, "comm_stats", None)


def c2r_moe_spec(
    moe_spec: Any,
    dispatcher: str = "dedup",
    *,
    hierarchy: str = "auto",
    gpus_per_node: Optional[int] = None,
    topology_memo: Optional[TopologyMemo] = None,
) -> Any:
    """A copy of Megatron's MoE layer spec (``ModuleSpec`` or 0.18+ partial) that builds
    :class:`C2RMoELayer` with the given dispatcher (and, for ``"dedup"``, hierarchy, simulated
    nodes and shared topology memo); submodules (router, experts) unchanged."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher={dispatcher!r} is not one of {DISPATCHERS}; pick one")
    check_hierarchy(hierarchy)
    params: Dict[str, Any] = dict(dispatcher=dispatcher)
    if dispatcher == "dedup":
        params.update(hierarchy=hierarchy, gpus_per_node=gpus_per_node, topology_memo=topology_memo)
    return compat.with_moe_layer_params(moe_spec, C2RMoELayer, **params)


def _check_router_nodes(router, topology: NodeTopology, gpus_per_node: Optional[int]) -> None:
    """Node-limited routing (``c2r.mode='node'`` over the EP ranks) must limit tokens to the
    nodes the dispatcher sees; a different count is a one-line error (same on every rank)."""
    cfg = getattr(router, "c2r_config", None)
    if cfg is None or cfg.mode != "node" or cfg.num_groups != topology.ep_size:
        return
    if cfg.num_nodes != topology.num_nodes:
        source = (
            f"c2r.gpus_per_node={gpus_per_node}" if gpus_per_node is not None
            else "the processes' hostnames"
        )  # fmt: skip
        raise ValueError(
            f"c2r.num_nodes={cfg.num_nodes} but the EP group of {topology.ep_size} ranks spans "
            f"{topology.num_nodes} node(s) ({source}): set c2r.num_nodes: {topology.num_nodes}, "
            f"c2r.gpus_per_node to simulate nodes, or c2r.hierarchy: flat"
        )


def moe_layers(model) -> List[torch.nn.Module]:
    """Every Megatron MoE layer of a model or a list of model chunks, in module order (= the plan
    file's layer order).

    Matches ``BaseMoELayer``, the class that defines what both users read (``router``,
    ``experts``, ``config``, ``num_local_experts``, ``local_expert_indices``, ``layer_number``):
    Megatron's ``MoELayer``, our ``C2RMoELayer`` and any other subclass, so a custom MoE layer
    gets metrics and relabelling too (relabelling then checks its experts module itself).
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, BaseMoELayer)]
