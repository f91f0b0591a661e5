"""Re-plan inside a running expert-parallel job: relabel experts across EP ranks.

Each EP rank r holds experts [r*N, (r+1)*N), N = E/P. Relabelling with ``order`` (NEW expert i is
OLD expert ``order[i]``) moves old expert ``order[i]`` from rank ``order[i] // N`` to rank
``i // N``. Everything that follows an expert moves with it in ONE ``all_to_all_single`` per
layer over the EP group: weights, .grad / .main_grad when present, and the optimizer state
tensors of the parameter's shape (e.g. AdamW exp_avg, exp_avg_sq), packed as raw bytes so mixed
dtypes share the message. Expert slots and router state move as ``permutation.py`` defines (the same
rules as in-model relabelling and ``convert``); router tensors are replicated over EP, so every
rank permutes its own copy (``relabel.relabel_router_``).

Scope: ``torch.optim`` optimizers (state keyed by parameter). Megatron's DistributedOptimizer
keeps fp32 copies in flat sharded buffers; relabel those offline (``checkpoint.py``) instead.
Shape suffixes: the legend in ``megatron_c2r/placement/__init__.py`` (B = bytes here).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_c2r.placement.permutation import check_order, local_expert_slots, slot_tensors
from megatron_c2r.placement.plan_file import PlanLayer
from megatron_c2r.placement.relabel import moe_layers, num_experts_of, relabel_router_


def _ep_group(layer) -> Optional[dist.ProcessGroup]:
    group = getattr(layer.experts, "ep_group", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_expert_model_parallel_group()
    return group


def _pack(views: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """uint8 [B], B = bytes per expert: the expert's tensors' raw bytes, in ``names`` order."""
    return torch.cat([views[n].contiguous().view(-1).view(torch.uint8) for n in names])


def _unpack_(payload_B: torch.Tensor, views: dict[str, torch.Tensor], names: list[str]) -> None:
    offset = 0
    for n in names:
        dst = views[n]
        nbytes = dst.numel() * dst.element_size()
        dst.copy_(payload_B[offset:offset + nbytes].view(dst.dtype).view(dst.shape))
        offset += nbytes


@torch.no_grad()
def relabel_in_run_(layer, order, optimizer=None, ep_group=None) -> None:
    """Relabel one MoE layer across its EP group (collective: every EP rank calls with the same
    ``order``). The layer computes the same function afterwards; the optimizer continues as if
    nothing happened.

    1. Pack each local expert that leaves for rank d, ordered by its new id (so by d).
    2. One all_to_all_single of raw bytes over the EP group (self-sends included).
    3. Unpack into the new local slots: data from source rank s arrives in new-id order.
    4. Permute the replicated router state locally.
    """
    group = ep_group if ep_group is not None else _ep_group(layer)
    num_experts = num_experts_of(layer)
    order = check_order(order, num_experts)
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    slots = local_expert_slots(layer.experts)
    n = len(slots)
    if n * ep_size != num_experts:
        raise ValueError(f"{n} local experts x EP {ep_size} != num_experts {num_experts}: "
                         "pass the layer's expert-parallel group")
    views = [slot_tensors(s, optimizer) for s in slots]
    names = sorted(views[0])
    if any(sorted(v) != names for v in views):
        raise ValueError("local experts carry different tensors (optimizer state on some only)")
    src_rank_E = (order // n).tolist()  # new id -> rank holding it now
    src_local_E = (order % n).tolist()

    # 1. Send buffer: my experts, in order of new id (destination rank i // n ascending).
    sends = [i for i in range(num_experts) if src_rank_E[i] == ep_rank]
    payloads = [_pack(views[src_local_E[i]], names) for i in sends]
    nbytes = payloads[0].numel() if payloads else _pack(views[0], names).numel()
    input_splits = [0] * ep_size
    for i in sends:
        input_splits[i // n] += nbytes
    device = slots[0][0][0].device
    send_B = torch.cat(payloads) if payloads else torch.empty(0, dtype=torch.uint8, device=device)
    # 2. Receive my new slots, grouped by source rank, new-id order within a source.
    mine = list(range(ep_rank * n, (ep_rank + 1) * n))
    arrival = sorted(mine, key=lambda i: (src_rank_E[i], i))
    output_splits = [0] * ep_size
    for i in mine:
        output_splits[src_rank_E[i]] += nbytes
    recv_B = torch.empty(n * nbytes, dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv_B, send_B, output_splits, input_splits, group=group)
    # 3. Unpack (the send buffer holds copies, so overwriting local slots is safe).
    for k, i in enumerate(arrival):
        _unpack_(recv_B[k * nbytes:(k + 1) * nbytes], views[i - ep_rank * n], names)
    # 4. Router: replicated over EP.
    relabel_router_(layer.router, order, optimizer)


def replan_(
    model: torch.nn.Module,
    optimizer=None,
    *,
    top_k: int,
    ep_size: int,
    counts: Optional[Sequence[torch.Tensor]] = None,
    seed: int = 0,
    src_rank: int = 0,
    num_nodes: int = 1,
) -> list:
    """Plan every MoE layer from collaboration counts and relabel in place (collective over the
    default group and each layer's EP group).

    ``num_nodes`` N > 1 plans nodes first (N nodes of ``ep_size / N`` consecutive groups), then
    the groups inside each node, as ``megatron-c2r plan --nodes N`` does offline.

    ``counts``: per-layer [E, E] counts; default: each router's tracker (``router.tracker``,
    C2RRouter), which the caller reduces over data-parallel ranks first (``tracker.reduce_``).
    Global rank ``src_rank`` plans; the orders are broadcast so every rank applies the same one.
    Returns the per-layer ``PlanLayer`` (groups, predicted ranks per token) on every rank.
    """
    from megatron_c2r.placement.planner import PlannerConfig, plan_layer  # numpy planner, off-path
    from megatron_c2r.placement.sources import LayerCollab

    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers: nothing to re-plan")
    num_experts = num_experts_of(layers[0])
    if counts is None:
        if not all(hasattr(layer.router, "tracker") for layer in layers):
            raise ValueError("routers have no collaboration tracker: pass counts= or use C2RRouter")
        counts = [layer.router.tracker.counts for layer in layers]
    if len(counts) != len(layers):
        raise ValueError(f"{len(counts)} count matrices for {len(layers)} MoE layers")
    device = layers[0].router.weight.device  # NCCL broadcasts need device tensors
    layer_orders = torch.zeros(len(layers), num_experts, dtype=torch.int64)  # [layers, E]
    preds = torch.zeros(len(layers), 3, dtype=torch.float64)  # [layers, identity/random/planned]
    if dist.get_rank() == src_rank:
        config = PlannerConfig(ep_size=ep_size, seed=seed, num_nodes=num_nodes)
        for li, c in enumerate(counts):
            collab = LayerCollab.from_counts(c.double().cpu().numpy(), top_k)
            layer_plan = plan_layer(collab, config)
            layer_orders[li] = torch.tensor(layer_plan.order)
            r = layer_plan.predicted_ranks_per_token
            preds[li] = torch.tensor([r["identity"], r["random"], r["planned"]])
    layer_orders, preds = layer_orders.to(device), preds.to(device)
    dist.broadcast(layer_orders, src=src_rank)
    dist.broadcast(preds, src=src_rank)
    layer_orders, preds = layer_orders.cpu(), preds.cpu()
    out = []
    for li, (layer, order_E, pred) in enumerate(zip(layers, layer_orders, preds.tolist())):
        relabel_in_run_(layer, order_E, optimizer)
        groups = order_E.view(ep_size, -1).tolist()  # group g = new block g = EP rank g
        predicted = dict(zip(("identity", "random", "planned"), pred))
        out.append(PlanLayer.from_groups(li, groups, predicted))
    return out
