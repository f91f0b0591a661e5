"""Apply a placement to a model in memory by relabelling experts (a symmetry of the MoE layer).

Convention: ``order`` (int64 [E]): NEW expert i is OLD expert ``order[i]``. After relabelling,
router row i, expert i's weights, the tracker's row/column i and every optimizer state of those
are the old expert ``order[i]``'s, so the layer computes the same function and group g of the
plan is EP rank g's contiguous block.

What moves, per MoE layer:
    router   ``relabel_experts_(order)`` when the router has it (C2RRouter: weight rows, bias,
             expert bias, tracker, top-T lists); otherwise (stock TopKRouter) weight rows, bias,
             expert_bias, local/global_tokens_per_expert. Optimizer state of weight/bias rows
             (exp_avg, exp_avg_sq, ...) is permuted here in both cases.
    experts  SequentialMLP (one module per expert), GroupedMLP (weight1/weight2 hold all local
             experts: expert j is chunk j of ``weight.view(num_local_experts, -1)``, exactly how
             its forward views them), TEGroupedMLP (``weight{j}``/``bias{j}`` per expert).
             For each expert tensor: data, .grad, .main_grad and every optimizer state tensor
             of the parameter's shape.
This module relabels layers whose experts are all local (EP=1, or a gathered model); across EP
ranks the same slots move with one all-to-all (``replan.py``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence

import torch

from megatron_c2r.moe.layer import moe_layers  # the one definition (re-exported for replan)

# One expert's tensors: a list of (parameter, chunk index, number of chunks). The expert's part
# of a tensor t shaped like the parameter is t.view(num_chunks, -1)[chunk index].
ExpertSlot = list[tuple[torch.nn.Parameter, int, int]]

_ROUTER_EXPERT_TENSORS = (
    "weight", "bias", "expert_bias", "local_tokens_per_expert", "global_tokens_per_expert"
)
_TE_EXPERT_PARAM = re.compile(r"^(.*\.)?(weight|bias)(\d+)$")


def check_order(order, num_experts: int) -> torch.Tensor:
    """int64 [E] on CPU; ValueError unless ``order`` is a permutation of range(E)."""
    order = torch.as_tensor(order, dtype=torch.int64).reshape(-1).cpu()
    if order.numel() != num_experts or not torch.equal(order.sort().values,
                                                       torch.arange(num_experts)):
        raise ValueError(
            f"order={order.tolist()[:16]}... is not a permutation of 0..{num_experts - 1}: use "
            "the plan's groups concatenated"
        )
    return order


def local_expert_slots(experts: torch.nn.Module) -> list[ExpertSlot]:
    """The tensors of each local expert of a Megatron experts module, in local-expert order."""
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [[(p, 0, 1) for _, p in expert.named_parameters()]
                for expert in experts.local_experts]
    num_local = getattr(experts, "num_local_experts", None)
    if num_local is None:
        raise ValueError(f"{type(experts).__name__} is not a Megatron experts module "
                         "(SequentialMLP, GroupedMLP, TEGroupedMLP)")
    if hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # GroupedMLP
        return [[(experts.weight1, j, num_local), (experts.weight2, j, num_local)]
                for j in range(num_local)]
    slots: list[ExpertSlot] = [[] for _ in range(num_local)]  # TEGroupedMLP
    for name, p in experts.named_parameters():
        match = _TE_EXPERT_PARAM.match(name)
        if match is None:
            raise ValueError(f"{type(experts).__name__}.{name} is not a per-expert tensor: "
                             "cannot relabel this experts module")
        slots[int(match.group(3))].append((p, 0, 1))
    if any(len(s) != len(slots[0]) or not s for s in slots):
        raise ValueError(f"{type(experts).__name__}: experts have different tensors")
    return slots


def _companions(p: torch.nn.Parameter, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor that follows parameter ``p``: data, grad, main_grad, optimizer state."""
    out = {"data": p.data}
    if p.grad is not None:
        out["grad"] = p.grad
    if getattr(p, "main_grad", None) is not None:
        out["main_grad"] = p.main_grad
    if optimizer is not None:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                out[f"state.{key}"] = value
    return out


def slot_tensors(slot: ExpertSlot, optimizer=None) -> dict[str, torch.Tensor]:
    """name -> flat view of this expert's part, for every tensor that follows its parameters.
    Names are ``"{role}.{companion}"``; every expert of a module has the same names."""
    out = {}
    for role, (p, idx, num) in enumerate(slot):
        for kind, t in _companions(p, optimizer).items():
            out[f"{role}.{kind}"] = t.view(num, -1)[idx]
    return out


@torch.no_grad()
def permute_slots_(slots: Sequence[ExpertSlot], order: torch.Tensor, optimizer=None) -> None:
    """In place: slot i takes the tensors slot ``order[i]`` had (all slots local)."""
    views = [slot_tensors(s, optimizer) for s in slots]
    names = set(views[0])
    if any(set(v) != names for v in views):
        raise ValueError("experts carry different tensors (e.g. optimizer state on some only): "
                         "step the optimizer once on all experts or relabel without it")
    for name in names:
        stacked = torch.stack([views[int(old)][name] for old in order.tolist()])  # copies
        for i, v in enumerate(views):
            v[name].copy_(stacked[i])


@torch.no_grad()
def permute_rows_(t: torch.Tensor, order: torch.Tensor) -> None:
    t.copy_(t.index_select(0, order.to(t.device)))


@torch.no_grad()
def relabel_router_(router: torch.nn.Module, order: torch.Tensor, optimizer=None) -> None:
    """Router tensors indexed by expert (and their optimizer state) take row ``order[i]``."""
    if hasattr(router, "relabel_experts_"):
        router.relabel_experts_(order)
    else:
        for name in _ROUTER_EXPERT_TENSORS:
            t = getattr(router, name, None)
            if torch.is_tensor(t):
                permute_rows_(t, order)
    for name in ("weight", "bias"):
        p = getattr(router, name, None)
        if isinstance(p, torch.nn.Parameter):
            for kind, t in _companions(p, optimizer).items():
                if kind != "data":
                    permute_rows_(t, order)


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
    from megatron_c2r.placement.plan_file import Plan

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
