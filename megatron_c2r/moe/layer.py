"""``C2RMoELayer``: Megatron's ``MoELayer`` with a selectable token dispatcher.

Megatron picks its dispatcher from ``config.moe_token_dispatcher_type`` (allgather | alltoall |
flex) inside ``MoELayer.__init__``; there is no seam for a custom one. This subclass builds the
stock layer (router, experts, shared experts unchanged) and then replaces ``self.token_dispatcher``
when ``dispatcher="dedup"``. Use it per model through the layer spec::

    from megatron_c2r.moe.layer import c2r_moe_spec
    moe_spec = c2r_moe_spec(stock_moe_spec, dispatcher="dedup")   # or "megatron"

``dispatcher="megatron"`` keeps Megatron's own choice (the config's dispatcher type): the baseline
for A/B runs and the oracle in our tests. ``moe_layers(model)`` lists the MoE layers of a model
for the metrics owner and the relabelling code.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from megatron.core import utils
from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoELayer, MoESubmodules

from megatron_c2r import compat
from megatron_c2r.moe.dispatcher import DedupAlltoAllTokenDispatcher, validate_dedup_config
from megatron_c2r.moe.options import DISPATCHERS


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
        layer_kwargs: whatever else this Megatron's ``TransformerLayer`` passes to its MLP,
            forwarded to ``MoELayer`` unchanged (which keywords exist is ``compat``'s concern).

    Side effects: like ``MoELayer``. With ``"dedup"`` and a router that can defer its
    finite-logits check (``C2RRouter.defer_finite_check``), the router's check is folded into
    the dispatcher's count exchange: the layer's one host sync (``docs/hot_path.md``). The dedup
    dispatcher's row/byte counters are at :attr:`comm_stats`.
    """

    def __init__(
        self,
        config,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        dispatcher: str = "dedup",
        **layer_kwargs,
    ):
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r} is not one of {DISPATCHERS}; pick one")
        if pg_collection is None:
            pg_collection = compat.get_default_pg_collection()
        self.dispatcher = dispatcher
        if dispatcher == "megatron":
            super().__init__(config, submodules, layer_number, pg_collection, **layer_kwargs)
            return
        validate_dedup_config(
            config,
            utils.get_pg_size(pg_collection.ep),
            utils.get_pg_size(pg_collection.expt_tp),
        )
        with compat.cheap_stock_dispatcher(config):
            super().__init__(config, submodules, layer_number, pg_collection, **layer_kwargs)
        self.token_dispatcher = DedupAlltoAllTokenDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection,
            config_validated=True,
        )
        if hasattr(self.router, "defer_finite_check"):
            # The router records a device flag instead of syncing; the dispatcher ships it with
            # its count table and raises the router's error on every EP rank after the exchange.
            self.router.defer_finite_check = True
            self.token_dispatcher.finite_check_router = self.router

    @property
    def comm_stats(self):
        """The dedup dispatcher's :class:`~megatron_c2r.comm.CommStats` (None for "megatron")."""
        return getattr(self.token_dispatcher, "comm_stats", None)


def c2r_moe_spec(moe_spec: Any, dispatcher: str = "dedup") -> Any:
    """A copy of Megatron's MoE layer spec (``ModuleSpec`` or 0.18+ partial) that builds
    :class:`C2RMoELayer` with the given dispatcher; submodules (router, experts) unchanged."""
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher={dispatcher!r} is not one of {DISPATCHERS}; pick one")
    return compat.with_moe_layer_params(moe_spec, C2RMoELayer, dispatcher=dispatcher)


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
