"""Apply a placement to a model in memory by relabelling experts (a symmetry of the MoE layer).

Convention: ``order`` (int64 [E]): NEW expert i is OLD expert ``order[i]``. After relabelling,
router row i, expert i's weights, the tracker's row/column i and every optimizer state of those
are the old expert ``order[i]``'s, so the layer computes the same function and group g of the
plan is EP rank g's contiguous block. What each kind of state does is defined once, in
``permutation.py``; this module walks a model's MoE layers and applies it:
    router   ``C2RRouter.relabel_experts_`` (which also drops its caches) or, for a stock
             TopKRouter, ``permutation.permute_module_state_`` with ``ROUTER_STATE``; the
             optimizer state of weight / bias rows moves too.
    experts  ``permutation.local_expert_slots`` + ``permute_slots_``: data, .grad, .main_grad and
             every optimizer-state tensor of the parameter's shape.
This module relabels layers whose experts are all local (EP=1, or a gathered model); across EP
ranks the same slots move with one all-to-all (``replan.py``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from megatron_c2r.moe.layer import moe_layers  # the one definition (re-exported for replan)
from megatron_c2r.placement.plan_file import Plan
from megatron_c2r.placement.permutation import (
    ROUTER_STATE,
    check_order,
    local_expert_slots,
    permute_module_state_,
    permute_slots_,
)


def relabel_router_(router: torch.nn.Module, order_E: torch.Tensor, optimizer=None) -> None:
    """Router state indexed by expert (and its optimizer state) takes row ``order[i]``."""
    relabel = getattr(router, "relabel_experts_", None)  # C2RRouter: also resets its caches
    if relabel is not None:
        relabel(order_E, optimizer=optimizer)
    else:
        permute_module_state_(router, order_E, ROUTER_STATE, optimizer)


def num_experts_of(layer: torch.nn.Module) -> int:
    return int(layer.router.config.num_moe_experts)


def relabel_moe_layer_(layer: torch.nn.Module, order, optimizer=None) -> None:
    """Relabel one MoE layer whose experts are all local (EP=1). Output is unchanged."""
    num_experts = num_experts_of(layer)
    order = check_order(order, num_experts)
    slots = local_expert_slots(layer.experts)
    if len(slots) != num_experts:
        raise ValueError(
            f"this rank holds {len(slots)} of {num_experts} experts (EP>1): relabel across ranks "
            "with megatron_c2r.placement.replan.relabel_in_run_"
        )
    permute_slots_(slots, order, optimizer)
    relabel_router_(layer.router, order, optimizer)


def relabel_model_(
    model: torch.nn.Module,
    orders: Iterable,
    optimizer=None,
    relabel_layer: Optional[Callable] = None,
) -> None:
    """Relabel every MoE layer of ``model`` with its order (plan layer l -> l-th MoE layer).
    ``orders``: a Plan or per-layer orders. Checks the count before touching anything."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers: nothing to relabel")
    if isinstance(orders, Plan):
        orders.check_matches(num_experts=num_experts_of(layers[0]), num_layers=len(layers))
        orders = [layer.order for layer in orders.layers]
    orders = list(orders)
    if len(orders) != len(layers):
        raise ValueError(f"{len(orders)} orders for {len(layers)} MoE layers: one per layer")
    checked = [check_order(o, num_experts_of(layer)) for o, layer in zip(orders, layers)]
    for layer, order in zip(layers, checked):
        (relabel_layer or relabel_moe_layer_)(layer, order, optimizer)
