"""The one owner of C2R metrics: attach -> record -> report -> reset.

    metrics = C2RMetrics().attach(model)      # forward hooks on every MoE router (stock or ours)
    ... training forwards ...                 # hooks accumulate routing statistics on device
    metrics.record(model)                     # pull router statistics and dispatcher CommStats
    values = metrics.report(iteration, tb_writer=w, wandb_run=r, csv_path=p, print_fn=print)
    metrics.reset()

Nothing is global: every number lives in one ``C2RMetrics`` instance. Host syncs: none while
recording (hooks and ``record`` keep 0-dim tensors on the device; nothing runs while
``recording`` is False), one per ``compute``/``report`` (the copy of one table holding every
metric of every layer), plus one collective when a group is given. Names:

    moe/c2r/<metric>            mean over this model's MoE layers
    moe/c2r/<metric>_layer_<i>  one MoE layer, i = global layer index (layer_number - 1), as
                                Megatron's ``moe/<name>_layer_<i>``

Reduction (``compute(group)``): per layer, the sum of every rank's records over the sum of their
counts; layers are slots of one table indexed by the global layer index, so over a group spanning
data-parallel ranks and pipeline stages each layer is averaged over the DP ranks that hold it and
the stages fill disjoint slots -- what Megatron's tracker does for its own losses (sum over PP,
average over DP). ``penalty`` is the value Megatron's tracker logs as ``c2r_penalty``.

Metrics (per MoE layer; local tokens of this rank, averaged over records and ranks):
    ranks_per_token            distinct EP ranks holding a token's experts = rows per token that a
                               one-row-per-destination dispatcher (ours) ships
    rows_per_token_alltoall    rows per token Megatron's alltoall ships (one per (token, expert))
    row_reduction              rows_per_token_alltoall / ranks_per_token
    remote_fraction            share of our rows whose destination is another EP rank
    intra_group_share          share of a token's co-activated expert pairs inside one group
    tokens_per_expert_max_over_mean, tokens_per_expert_cv   load balance across experts
    overload_factor            busiest EP rank's (token, expert) assignments / the balanced share
    groups_per_token, violation_rate, penalty, constraint_active   from C2RRouter (its last forward)
    dispatched_rows_per_token, remote_byte_reduction          measured by the dedup dispatcher

Megatron-LM's loop clears its own MoE tracker every iteration; these metrics do not go through
that tracker, so nothing is lost, and the entry point reports them on its own schedule.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from megatron_c2r.moe.layer import moe_layers
from megatron_c2r.routing.functional import groups_per_token

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

Value = Union[float, torch.Tensor]


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
    """Routing statistics of one forward, as 0-dim float32 tensors on the map's device.

    No host sync: padding tokens are masked out of the map instead of indexed away (every
    statistic counts routed entries only, so a padded token with no experts adds nothing).

    Args:
        routing_map_TE: bool [T, E], token t uses expert e.
        ep_size, ep_rank: EP ranks P (expert e lives on rank e // (E/P)) and this rank.
        expert_to_group_E: int64 [E] group per expert (None -> the EP blocks); needs
            ``num_groups``.
        padding_T: bool [T] (any shape with T elements), True for padding tokens (excluded).
    """
    T, E = routing_map_TE.shape
    L, device = E // ep_size, routing_map_TE.device
    rmap_TE = routing_map_TE.bool()
    if padding_T is not None:
        rmap_TE = rmap_TE & ~padding_T.reshape(T, 1).bool()
    experts_E = torch.arange(E, device=device)
    # Distinct EP ranks per token: the groups-per-token rule with the EP blocks as groups.
    ranks_T = groups_per_token(
        rmap_TE, experts_E // L, ep_size, groups_GN=experts_E.view(ep_size, L)
    ).float()
    local_T = rmap_TE[:, ep_rank * L : (ep_rank + 1) * L].any(dim=1)  # a row to this rank
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
        expert_to_group_E, num_groups = experts_E // L, ep_size
    elif num_groups is None:
        raise ValueError(
            "routing_stats got expert_to_group_E without num_groups; pass num_groups (reading "
            "it from the map's max would sync with the device)"
        )
    per_group_TG = torch.zeros(T, num_groups, device=device)
    per_group_TG.index_add_(1, expert_to_group_E.to(device), rmap_TE.float())
    intra = (per_group_TG * (per_group_TG - 1) / 2).sum()
    pairs = (experts_T * (experts_T - 1) / 2).sum()
    return {
        "ranks_per_token": ranks_per_token,
        "rows_per_token_alltoall": alltoall,
        "row_reduction": alltoall / ranks_per_token.clamp(min=1e-12),
        "remote_fraction": (ranks_T.sum() - local_T.sum()) / rows,
        "intra_group_share": torch.where(pairs > 0, intra / pairs.clamp(min=1), torch.ones_like(pairs)),
        "tokens_per_expert_max_over_mean": tokens_E.max() / mean_E,
        "tokens_per_expert_cv": tokens_E.std(unbiased=False) / mean_E,
        "overload_factor": tokens_P.max() / tokens_P.mean().clamp(min=1e-12),
    }


# --------------------------------------------------------------------------------------------
# The owner
# --------------------------------------------------------------------------------------------
def _layer_index(layer) -> Optional[int]:
    number = getattr(layer, "layer_number", None)
    return None if number is None else int(number) - 1


def _num_layers(model) -> Optional[int]:
    """Decoder layers (+ MTP layers) from a model chunk's ``config``: the same on every rank of
    every pipeline stage, so it sizes the reduced table without a collective."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        config = getattr(chunk, "config", None)
        if isinstance(getattr(config, "num_layers", None), int):
            return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
    return None


class C2RMetrics:
    """Per-layer C2R metrics of one model; see the module docstring for the cycle and names.

    Args:
        prefix: metric name prefix.
        num_layers: size of the per-layer table reduced across ranks (global layers, MTP
            included). ``None``: taken from the first model chunk ``attach`` sees with a
            ``config``; if still unknown, ``compute(group)`` spends one extra collective (a MAX
            of the local sizes) to agree on it.

    State: ``_sums[name][layer]`` (float, or a 0-dim tensor on the device accumulated in its
    producer's dtype, at least fp32) and ``_counts[name][layer]`` (int); ``recording`` gates
    the forward hooks (the entry point records only iterations it logs).
    """

    def __init__(self, prefix: str = PREFIX, num_layers: Optional[int] = None):
        self.prefix = prefix
        self.num_layers = num_layers
        self.recording = True
        self._sums: Dict[str, Dict[int, Value]] = {}
        self._counts: Dict[str, Dict[int, int]] = {}
        self._handles: List = []

    # ---- record ------------------------------------------------------------------------------
    def attach(self, model) -> "C2RMetrics":
        """Register a forward hook on each MoE layer's router (side effect on ``model``; undo
        with ``detach``). Works for Megatron's TopKRouter too, so baselines get the same
        routing metrics."""
        if self.num_layers is None:
            self.num_layers = _num_layers(model)
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

    def add(self, layer_index: int, values: Dict[str, Value]) -> None:
        """Accumulate one record of ``values`` (floats or 0-dim tensors) for a layer. Tensors stay
        on their device (no sync), summed in their dtype promoted to at least fp32."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.promote_types(value.dtype, torch.float32))
            sums, counts = self._sums.setdefault(name, {}), self._counts.setdefault(name, {})
            sums[layer_index] = sums[layer_index] + value if layer_index in sums else value
            counts[layer_index] = counts.get(layer_index, 0) + 1

    def record(self, model) -> None:
        """Pull what routers and dispatchers computed themselves, without a host sync: the C2R
        router's statistics of its last forward (0-dim tensors, summed in fp64 as the floats of
        earlier releases were) and the dedup dispatcher's ``CommStats`` (host ints; read, then
        reset)."""
        for layer in moe_layers(model):
            index = _layer_index(layer)
            if index is None:
                continue
            last = getattr(layer.router, "_last", None)  # C2RRouter; TopKRouter has none
            if last:
                self.add(index, {k: _as_fp64(v) for k, v in last.items()})
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

        ``group``: a torch.distributed group to average over (sum of sums / sum of counts per
        layer slot; a collective: every rank of ``group`` must call it, with the same
        ``num_layers``). Only METRIC_NAMES are reduced; other names stay local. One host sync;
        one collective (two if ``num_layers`` is unknown)."""
        reduce = group is not None and dist.is_initialized()
        names = [n for n in METRIC_NAMES if n in self._sums] + sorted(
            n for n in self._sums if n not in METRIC_NAMES
        )
        rows = list(METRIC_NAMES) if reduce else names
        rows += [n for n in names if n not in rows]  # local extras after the reduced block
        width = self._table_width(group if reduce else None)
        device = self._table_device(group if reduce else None)
        table = self._table(rows, width, device)  # [rows, width, 2] fp64: sums, counts
        if reduce:
            reduced = table[: len(METRIC_NAMES)]  # a view: reduced in place
            dist.all_reduce(reduced, group=group)
        host = table.cpu().tolist()  # the one device->host sync of a report
        per_layer = {
            name: {i: s / c for i, (s, c) in enumerate(host[row]) if c > 0}
            for row, name in enumerate(rows)
        }
        out: Dict[str, float] = {}
        for name in rows:
            layers = per_layer[name]
            if layers:
                out[f"{self.prefix}/{name}"] = sum(layers.values()) / len(layers)
        for name in rows:
            for index, value in per_layer[name].items():
                out[f"{self.prefix}/{name}_layer_{index}"] = value
        return out

    def _table_width(self, group) -> int:
        local = 1 + max((max(v) for v in self._sums.values() if v), default=-1)
        if self.num_layers is not None:
            if local > self.num_layers:
                raise ValueError(
                    f"a metric was recorded for layer index {local - 1} but num_layers="
                    f"{self.num_layers}; pass C2RMetrics(num_layers=...) covering every layer"
                )
            return self.num_layers
        if group is None:
            return local
        size = torch.tensor([local], dtype=torch.int64, device=self._table_device(group))
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
        return int(size.item())

    def _table_device(self, group) -> torch.device:
        if group is not None:
            return torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        for sums in self._sums.values():
            for value in sums.values():
                if isinstance(value, torch.Tensor):
                    return value.device
        return torch.device("cpu")

    def _table(self, rows: List[str], width: int, device: torch.device) -> torch.Tensor:
        """``[len(rows), width, 2]`` fp64 on ``device``: per (metric, layer) the sum and count.
        Host floats and counts go in one host->device copy, device sums in one index_add (no
        host sync, no per-element device op)."""
        host = [[[0.0, 0.0] for _ in range(width)] for _ in rows]
        slots, tensors = [], []
        for row, name in enumerate(rows):
            for index, value in self._sums.get(name, {}).items():
                host[row][index][1] = float(self._counts[name][index])
                if isinstance(value, torch.Tensor):
                    slots.append((row * width + index) * 2)
                    tensors.append(value.to(device, torch.float64))
                else:
                    host[row][index][0] = value
        table = torch.tensor(host, dtype=torch.float64).reshape(len(rows), width, 2).to(device)
        if tensors:
            slots_t = torch.tensor(slots, dtype=torch.int64).to(device)
            table.view(-1).index_add_(0, slots_t, torch.stack(tensors))
        return table

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


def _as_fp64(value: Value) -> Value:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else value


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
