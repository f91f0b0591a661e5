"""The one owner of C2R metrics: attach -> record -> report -> reset.

    metrics = C2RMetrics().attach(model)      # forward hooks on every MoE router (stock or ours)
    ... training forwards ...                 # hooks accumulate routing statistics on device
    metrics.record(model)                     # pull router c2r_metrics() and dispatcher CommStats
    values = metrics.report(iteration, tb_writer=w, wandb_run=r, csv_path=p, print_fn=print)
    metrics.reset()

Nothing is global: every number lives in one ``C2RMetrics`` instance. Accumulators stay on the
device until ``compute``/``report`` (one host sync per report, none per step). Names:

    moe/c2r/<metric>            mean over this model's MoE layers
    moe/c2r/<metric>_layer_<i>  one MoE layer, i = global layer index (layer_number - 1), as
                                Megatron's ``moe/<name>_layer_<i>``

Metrics (per MoE layer; local tokens of this rank, averaged over records and ranks):
    ranks_per_token            distinct EP ranks holding a token's experts = rows per token that a
                               one-row-per-destination dispatcher (ours) ships
    rows_per_token_alltoall    rows per token Megatron's alltoall ships (one per (token, expert))
    row_reduction              rows_per_token_alltoall / ranks_per_token
    remote_fraction            share of our rows whose destination is another EP rank
    intra_group_share          share of a token's co-activated expert pairs inside one group
    tokens_per_expert_max_over_mean, tokens_per_expert_cv   load balance across experts
    overload_factor            busiest EP rank's (token, expert) assignments / the balanced share
    groups_per_token, violation_rate, penalty, constraint_active   from C2RRouter.c2r_metrics()
    dispatched_rows_per_token, remote_byte_reduction          measured by the dedup dispatcher

Megatron-LM's loop clears its own MoE tracker every iteration; these metrics do not go through
that tracker, so nothing is lost, and the entry point reports them on its own schedule.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, Iterable, List, Optional

import torch

PREFIX = "moe/c2r"
# Fixed order: also the order ranks agree on when reducing.
METRIC_NAMES = (
    "ranks_per_token",
    "rows_per_token_alltoall",
    "row_reduction",
    "remote_fraction",
    "intra_group_share",
    "tokens_per_expert_max_over_mean",
    "tokens_per_expert_cv",
    "overload_factor",
    "groups_per_token",
    "violation_rate",
    "penalty",
    "constraint_active",
    "dispatched_rows_per_token",
    "remote_byte_reduction",
)


# --------------------------------------------------------------------------------------------
# Pure statistics of one routing map
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def routing_stats(
    routing_map_TE: torch.Tensor,
    *,
    ep_size: int,
    ep_rank: int = 0,
    expert_to_group_E: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    padding_T: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Routing statistics of one forward, as 0-dim float tensors on the map's device (no sync).

    Args:
        routing_map_TE: bool [T, E], token t uses expert e.
        ep_size, ep_rank: EP ranks P (expert e lives on rank e // (E/P)) and this rank.
        expert_to_group_E: int64 [E] group per expert (None -> the EP blocks).
        padding_T: bool [T], True for padding tokens (excluded).
    """
    T, E = routing_map_TE.shape
    rmap_TE = routing_map_TE.bool()
    if padding_T is not None:
        rmap_TE = rmap_TE[~padding_T.reshape(-1).bool()]
    rank_TP = rmap_TE.view(-1, ep_size, E // ep_size).any(dim=2)
    ranks_T = rank_TP.sum(dim=1).float()
    experts_T = rmap_TE.sum(dim=1).float()
    routed_T = experts_T > 0
    n_routed = routed_T.sum().clamp(min=1).float()
    rows = ranks_T.sum().clamp(min=1)
    ranks_per_token = ranks_T.sum() / n_routed
    alltoall = experts_T.sum() / n_routed

    tokens_E = rmap_TE.sum(dim=0).float()
    mean_E = tokens_E.mean().clamp(min=1e-12)
    tokens_P = tokens_E.view(ep_size, -1).sum(dim=1)

    if expert_to_group_E is None:
        expert_to_group_E = torch.arange(E, device=rmap_TE.device) // (E // ep_size)
        num_groups = ep_size
    expert_to_group_E = expert_to_group_E.to(rmap_TE.device)
    num_groups = num_groups or int(expert_to_group_E.max()) + 1
    per_group_TG = torch.zeros(rmap_TE.shape[0], num_groups, device=rmap_TE.device)
    per_group_TG.index_add_(1, expert_to_group_E, rmap_TE.float())
    intra = (per_group_TG * (per_group_TG - 1) / 2).sum()
    pairs = (experts_T * (experts_T - 1) / 2).sum()
    return {
        "ranks_per_token": ranks_per_token,
        "rows_per_token_alltoall": alltoall,
        "row_reduction": alltoall / ranks_per_token.clamp(min=1e-12),
        "remote_fraction": (ranks_T.sum() - rank_TP[:, ep_rank].sum()) / rows,
        "intra_group_share": torch.where(pairs > 0, intra / pairs.clamp(min=1), torch.ones_like(pairs)),
        "tokens_per_expert_max_over_mean": tokens_E.max() / mean_E,
        "tokens_per_expert_cv": tokens_E.std(unbiased=False) / mean_E,
        "overload_factor": tokens_P.max() / tokens_P.mean().clamp(min=1e-12),
    }


# --------------------------------------------------------------------------------------------
# The owner
# --------------------------------------------------------------------------------------------
def moe_layers(model) -> Iterable[torch.nn.Module]:
    """Every Megatron MoE layer (``BaseMoELayer``) in a model or a list of model chunks."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for module in chunk.modules():
            if isinstance(module, BaseMoELayer):
                yield module


def _layer_index(layer) -> Optional[int]:
    number = getattr(layer, "layer_number", None)
    return None if number is None else int(number) - 1


class C2RMetrics:
    """Per-layer C2R metrics of one model; see the module docstring for the cycle and names.

    State: ``_sums[name][layer]`` (float or 0-dim tensor) and ``_counts[name][layer]`` (int);
    ``recording`` gates the forward hooks (the entry point records only iterations it logs).
    """

    def __init__(self, prefix: str = PREFIX):
        self.prefix = prefix
        self.recording = True
        self._sums: Dict[str, Dict[int, object]] = {}
        self._counts: Dict[str, Dict[int, int]] = {}
        self._handles: List = []

    # ---- record ------------------------------------------------------------------------------
    def attach(self, model) -> "C2RMetrics":
        """Register a forward hook on each MoE layer's router (side effect on ``model``; undo
        with ``detach``). Works for Megatron's TopKRouter too, so baselines get the same
        routing metrics."""
        for layer in moe_layers(model):
            hook = self._router_hook(layer)
            self._handles.append(layer.router.register_forward_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook ``attach`` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _router_hook(self, layer) -> Callable:
        num_experts = layer.config.num_moe_experts
        ep_size = num_experts // layer.num_local_experts
        ep_rank = layer.local_expert_indices[0] // layer.num_local_experts

        def hook(router, args, kwargs, output):
            index = _layer_index(layer)
            if not self.recording or not router.training or index is None:
                return
            padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            groups = getattr(router, "expert_to_group", None)
            c2r_cfg = getattr(router, "c2r_config", None)
            stats = routing_stats(
                output[1],
                ep_size=ep_size,
                ep_rank=ep_rank,
                expert_to_group_E=groups,
                num_groups=getattr(c2r_cfg, "num_groups", None) if groups is not None else None,
                padding_T=padding,
            )
            self.add(index, stats)

        return hook

    def add(self, layer_index: int, values: Dict[str, object]) -> None:
        """Accumulate one record of ``values`` (floats or 0-dim tensors) for a layer."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            sums, counts = self._sums.setdefault(name, {}), self._counts.setdefault(name, {})
            sums[layer_index] = sums[layer_index] + value if layer_index in sums else value
            counts[layer_index] = counts.get(layer_index, 0) + 1

    def record(self, model) -> None:
        """Pull what routers and dispatchers computed themselves: ``C2RRouter.c2r_metrics()``
        (last forward) and the dedup dispatcher's ``CommStats`` (read, then reset)."""
        for layer in moe_layers(model):
            index = _layer_index(layer)
            if index is None:
                continue
            router_metrics = getattr(layer.router, "c2r_metrics", None)
            if router_metrics is not None:
                self.add(index, router_metrics())
            stats = getattr(layer, "comm_stats", None)
            if stats is not None and stats.calls:
                self.add(
                    index,
                    {
                        "dispatched_rows_per_token": stats.rows_dispatched / max(stats.routed_tokens, 1),
                        "remote_byte_reduction": stats.remote_byte_reduction,
                    },
                )
                stats.reset()

    # ---- report ------------------------------------------------------------------------------
    def compute(self, group=None) -> Dict[str, float]:
        """Per-layer means and their mean over layers, named ``<prefix>/<metric>[_layer_<i>]``.

        ``group``: a torch.distributed group to average over (sum of sums / sum of counts; a
        collective: every rank of ``group`` must call it). Only METRIC_NAMES are reduced."""
        names = [n for n in METRIC_NAMES if n in self._sums] + sorted(
            n for n in self._sums if n not in METRIC_NAMES
        )
        per_layer = {n: self._local_means(n) for n in names}
        if group is not None and torch.distributed.is_initialized():
            per_layer.update(self._reduced(group))
        out: Dict[str, float] = {}
        for name in names + [n for n in per_layer if n not in names]:
            layers = per_layer.get(name) or {}
            if not layers:
                continue
            out[f"{self.prefix}/{name}"] = sum(layers.values()) / len(layers)
        for name, layers in per_layer.items():
            for index in sorted(layers):
                out[f"{self.prefix}/{name}_layer_{index}"] = layers[index]
        return out

    def _local_means(self, name: str) -> Dict[int, float]:
        return {i: float(s) / self._counts[name][i] for i, s in self._sums[name].items()}

    def _reduced(self, group) -> Dict[str, Dict[int, float]]:
        dist = torch.distributed
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        local_max = max((max(v) for v in self._sums.values() if v), default=-1)
        size = torch.tensor([local_max + 1], dtype=torch.int64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
        table = torch.zeros(len(METRIC_NAMES), int(size.item()), 2, dtype=torch.float64, device=device)
        for row, name in enumerate(METRIC_NAMES):
            for index, value in self._sums.get(name, {}).items():
                table[row, index, 0] = float(value)
                table[row, index, 1] = self._counts[name][index]
        dist.all_reduce(table, group=group)
        out: Dict[str, Dict[int, float]] = {}
        for row, name in enumerate(METRIC_NAMES):
            counts = table[row, :, 1]
            out[name] = {
                int(i): float(table[row, i, 0] / counts[i]) for i in torch.nonzero(counts).flatten()
            }
        return {k: v for k, v in out.items() if v}

    def report(
        self,
        iteration: int,
        *,
        tb_writer=None,
        wandb_run=None,
        csv_path: Optional[str] = None,
        print_fn: Optional[Callable[[str], None]] = None,
        group=None,
        per_layer: bool = True,
    ) -> Dict[str, float]:
        """Compute (over ``group``) and write to every sink given; returns the values. Does not
        reset: call ``reset()`` when the next interval starts."""
        values = self.compute(group)
        if not values:
            return values
        shown = values if per_layer else {k: v for k, v in values.items() if "_layer_" not in k}
        if tb_writer is not None:
            for name, value in shown.items():
                tb_writer.add_scalar(name, value, iteration)
        if wandb_run is not None:
            wandb_run.log(dict(shown), step=iteration)
        if csv_path:
            write_csv(csv_path, iteration, values)
        if print_fn is not None:
            print_fn(console_line(iteration, values, self.prefix))
        return values

    def reset(self) -> None:
        """Forget everything recorded (hooks stay attached)."""
        self._sums.clear()
        self._counts.clear()


def console_line(iteration: int, values: Dict[str, float], prefix: str = PREFIX) -> str:
    """`` iteration N | moe/c2r ranks_per_token 1.000 | ...`` (layer means only)."""
    parts = [
        f"{name[len(prefix) + 1:]} {value:.4g}"
        for name, value in values.items()
        if "_layer_" not in name and math.isfinite(value)
    ]
    return f" iteration {iteration:8d} | {prefix} " + " | ".join(parts)


def write_csv(path: str, iteration: int, values: Dict[str, float]) -> None:
    """Append ``iteration,metric,value`` rows (header written when the file is new)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["iteration", "metric", "value"])
        for name, value in values.items():
            writer.writerow([iteration, name, f"{value:.6g}"])
