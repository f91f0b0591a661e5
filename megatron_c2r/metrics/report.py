"""The one owner of C2R metrics: attach -> record -> report -> reset.

    metrics = C2RMetrics().attach(model)      # forward hooks on every MoE router (stock or ours)
    ... training forwards ...                 # hooks accumulate routing statistics on device
    metrics.record(model)                     # pull router statistics and dispatcher CommStats
    values = metrics.report(iteration, tb_writer=w, wandb_run=r, csv_path=p, print_fn=print)
    metrics.reset()

Nothing is global: every number lives in one ``C2RMetrics`` instance. Host syncs: none while
recording (hooks and ``record`` keep tensors on the device; nothing runs while ``recording`` is
False), one per ``compute``/``report`` (the copy of one buffer holding every metric of every
layer), plus one collective when a group is given. Names:

    moe/c2r/<metric>            mean over this model's MoE layers
    moe/c2r/<metric>_layer_<i>  one MoE layer, i = global layer index (layer_number - 1), as
                                Megatron's ``moe/<name>_layer_<i>``

Reduction (``compute(group)``): per layer, the sum of every rank's records over the sum of their
counts; layers are slots of one table indexed by the global layer index, so over a group spanning
data-parallel ranks and pipeline stages each layer is averaged over the DP ranks that hold it and
the stages fill disjoint slots -- what Megatron's tracker does for its own losses (sum over PP,
average over DP). ``penalty`` is the value Megatron's tracker holds as ``c2r_penalty``,
``device_balance_loss`` / ``comm_balance_loss`` those it holds under the same names.

Busiest-over-mean loads (``LOAD_NAMES``, in the same buffer and collective): per layer, what each
rank's tokens load onto every EP rank and node (``metrics.stats.routing_loads``), summed over the
records and the group's ranks -- every source, so a slot holds what that EP rank (node) received
over the logged iteration, summed over the EP groups of the DP/PP ranks at that EP index -- then
busiest / mean on the host. Without a group: this rank's tokens only.

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
    device_balance_loss, comm_balance_loss   from C2RRouter, with c2r.device_balance_coeff /
                               comm_balance_coeff > 0 (unscaled, as Megatron's tracker holds them;
                               Megatron-LM's training_log does not report those tracker names)
    dispatched_rows_per_token, remote_byte_reduction          measured by the dedup dispatcher
    nodes_per_token, group_load_max_over_mean, node_load_max_over_mean   from C2RRouter: this
                               rank's tokens only (node ones with node routing)
    inter_node_rows_per_token, inter_node_byte_reduction      measured by the two-level dispatcher
  over every source rank of the group (one value per layer, not a mean over ranks):
    busiest_rank_tokens_over_mean  busiest EP rank's expert input rows ((token, expert) pairs)
                               over the mean (the experts' work; an EP step waits for it)
    busiest_rank_rows_over_mean    the same for rows received, one per (token, rank) (our
                               dispatcher's all-to-all; Megatron's alltoall receives the tokens)
    busiest_node_tokens_over_mean, busiest_node_rows_over_mean   the same per node (rows: one per
                               (token, node), the two-level dispatcher's node rows), when the
                               layer knows its nodes (``C2RMoELayer.topology``, or node routing)

Megatron-LM's loop clears its own MoE tracker every iteration; these metrics do not go through
that tracker, so nothing is lost, and the entry point reports them on its own schedule.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from megatron_c2r import compat
from megatron_c2r.metrics.stats import LOAD_NAMES, busiest_over_mean, routing_loads, routing_stats
from megatron_c2r.moe.layer import moe_layers

__all__ = ["C2RMetrics", "LOAD_NAMES", "METRIC_NAMES", "console_line", "routing_stats", "write_csv"]

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
    "device_balance_loss",
    "comm_balance_loss",
    "constraint_active",
    "dispatched_rows_per_token",
    "remote_byte_reduction",
    "nodes_per_token",
    "group_load_max_over_mean",
    "node_load_max_over_mean",
    "inter_node_rows_per_token",
    "inter_node_byte_reduction",
    "relaxed_share",
    "mean_budget",
    "locality_bias",
)

Value = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------
# The owner
# --------------------------------------------------------------------------------------------
def _layer_index(layer) -> Optional[int]:
    number = getattr(layer, "layer_number", None)
    return None if number is None else int(number) - 1


def _model_config(model):
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        config = getattr(chunk, "config", None)
        if isinstance(getattr(config, "num_layers", None), int):
            return config
    return None


def _num_layers(model) -> Optional[int]:
    """Decoder layers (+ MTP layers) from a model chunk's ``config``: the same on every rank of
    every pipeline stage, so it sizes the reduced table without a collective."""
    config = _model_config(model)
    if config is None:
        return None
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def _layer_ep_size(layer) -> int:
    return layer.config.num_moe_experts // layer.num_local_experts


def _ep_size(model) -> Optional[int]:
    """EP size P of the load table: from the model's MoE layers, else (a stage without MoE
    layers) its config's ``expert_model_parallel_size``, the same on every rank in Megatron."""
    layers = moe_layers(model)
    if layers:
        return max(_layer_ep_size(layer) for layer in layers)
    config = _model_config(model)
    return getattr(config, "expert_model_parallel_size", None) if config is not None else None


def _ranks_per_node(layer, ep_size: int) -> Optional[int]:
    """EP ranks per node for a layer's node loads: the dedup dispatcher's topology, else node
    routing over the EP ranks (``c2r.num_nodes``), else unknown."""
    topology = getattr(layer, "topology", None)
    if topology is not None:
        return topology.ranks_per_node
    cfg = getattr(layer.router, "c2r_config", None)
    if cfg is not None and cfg.mode == "node" and cfg.num_groups == ep_size and cfg.num_nodes:
        return ep_size // cfg.num_nodes
    return None


class C2RMetrics:
    """Per-layer C2R metrics of one model; see the module docstring for the cycle and names.

    Args:
        prefix: metric name prefix.
        num_layers: size of the per-layer table reduced across ranks (global layers, MTP
            included). ``None``: taken from the first model chunk ``attach`` sees with a
            ``config``; if still unknown, ``compute(group)`` spends one extra collective (a MAX
            of the local sizes) to agree on it.
        ep_size: EP ranks P of the load table (same rule: from ``attach``, else agreed).

    State: ``_sums[name][layer]`` (float, or a 0-dim tensor on the device accumulated in its
    producer's dtype, at least fp32), ``_counts[name][layer]`` (int) and ``_loads[layer]``
    (``[4, P + 2]`` fp64 on the device, summed :func:`routing_loads`); ``recording`` gates
    the forward hooks (the entry point records only iterations it logs).
    """

    def __init__(
        self, prefix: str = PREFIX, num_layers: Optional[int] = None, ep_size: Optional[int] = None
    ):
        self.prefix = prefix
        self.num_layers = num_layers
        self.ep_size = ep_size
        self._recording = True
        self._routers: List = []
        self._sums: Dict[str, Dict[int, Value]] = {}
        self._counts: Dict[str, Dict[int, int]] = {}
        self._loads: Dict[int, torch.Tensor] = {}
        self._handles: List = []

    @property
    def recording(self) -> bool:
        """Whether forwards are recorded now. Setting it also sets ``stats_wanted`` on every
        attached C2R router, so a router skips its own statistics on iterations nobody logs."""
        return self._recording

    @recording.setter
    def recording(self, value: bool) -> None:
        self._recording = bool(value)
        for router in self._routers:
            router.stats_wanted = self._recording

    # ---- record ------------------------------------------------------------------------------
    def attach(self, model) -> "C2RMetrics":
        """Register a forward hook on each MoE layer's router (side effect on ``model``; undo
        with ``detach``). Works for Megatron's TopKRouter too, so baselines get the same
        routing metrics."""
        if self.num_layers is None:
            self.num_layers = _num_layers(model)
        if self.ep_size is None:
            self.ep_size = _ep_size(model)
        for layer in moe_layers(model):
            hook = self._router_hook(layer)
            self._handles.append(layer.router.register_forward_hook(hook, with_kwargs=True))
            if hasattr(layer.router, "stats_wanted"):  # C2RRouter
                self._routers.append(layer.router)
                layer.router.stats_wanted = self._recording
        return self

    def detach(self) -> None:
        """Remove every hook ``attach`` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for router in self._routers:
            router.stats_wanted = True
        self._routers.clear()

    def _router_hook(self, layer) -> Callable:
        ep_size = _layer_ep_size(layer)
        ep_rank = layer.local_expert_indices[0] // layer.num_local_experts
        ranks_per_node = _ranks_per_node(layer, ep_size)

        def hook(router, args, kwargs, output):
            index = _layer_index(layer)
            if not self.recording or not router.training or index is None or compat.in_backward():
                return  # (in backward: activation recompute's second forward, recorded once)
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
            self.add_loads(
                index,
                routing_loads(
                    output[1], ep_size=ep_size, ranks_per_node=ranks_per_node, padding_T=padding
                ),
            )

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

    def add_loads(self, layer_index: int, load_4X: torch.Tensor) -> None:
        """Accumulate one :func:`~megatron_c2r.metrics.stats.routing_loads` table for a layer
        (on its device, no sync)."""
        loads = self._loads.get(layer_index)
        self._loads[layer_index] = load_4X if loads is None else loads + load_4X

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
                routed = max(stats.routed_tokens, 1)
                values = {
                    "dispatched_rows_per_token": stats.rows_dispatched / routed,
                    "remote_byte_reduction": stats.remote_byte_reduction,
                }
                if hasattr(stats, "inter_node_rows_per_token"):  # the two-level dispatcher
                    values["inter_node_rows_per_token"] = stats.inter_node_rows_per_token
                    values["inter_node_byte_reduction"] = stats.inter_node_byte_reduction
                self.add(index, values)
                stats.reset()

    # ---- report ------------------------------------------------------------------------------
    def compute(self, group=None) -> Dict[str, float]:
        """Per-layer values and their mean over layers, named ``<prefix>/<metric>[_layer_<i>]``.

        ``group``: a torch.distributed group to reduce over (sum of sums / sum of counts per
        layer slot; loads summed per slot; a collective: every rank of ``group`` must call it,
        with the same ``num_layers`` and ``ep_size``). Only METRIC_NAMES and LOAD_NAMES are
        reduced; other names stay local. One host sync; one collective (two if a size is
        unknown)."""
        reduce = group is not None and dist.is_initialized()
        names = [n for n in METRIC_NAMES if n in self._sums] + sorted(
            n for n in self._sums if n not in METRIC_NAMES
        )
        rows = list(METRIC_NAMES) if reduce else names
        rows += [n for n in names if n not in rows]  # local extras after the reduced block
        width, P = self._sizes(group if reduce else None)
        device = self._table_device(group if reduce else None)
        loads = self._load_table(width, P, device)  # [4, width, P + 2]
        table = self._table(rows, width, device)  # [rows, width, 2] fp64: sums, counts
        flat = torch.cat([loads.flatten(), table.flatten()])
        if reduce:  # loads, then the METRIC_NAMES rows: one contiguous prefix, reduced in place
            dist.all_reduce(flat[: loads.numel() + len(METRIC_NAMES) * width * 2], group=group)
        host = flat.cpu().tolist()  # the one device->host sync of a report
        X, offset = P + 2, loads.numel()
        per_layer: Dict[str, Dict[int, float]] = {}
        for row, name in enumerate(rows):
            cells = host[offset + row * width * 2 : offset + (row + 1) * width * 2]
            sums, counts = cells[0::2], cells[1::2]
            per_layer[name] = {i: sums[i] / counts[i] for i in range(width) if counts[i] > 0}
        for k, name in enumerate(LOAD_NAMES):
            per_layer[name] = {}
            for i in range(width):
                value = busiest_over_mean(host[(k * width + i) * X : (k * width + i + 1) * X])
                if value is not None:
                    per_layer[name][i] = value
        out: Dict[str, float] = {}
        for name, layers in per_layer.items():
            if layers:
                out[f"{self.prefix}/{name}"] = sum(layers.values()) / len(layers)
        for name, layers in per_layer.items():
            for index, value in layers.items():
                out[f"{self.prefix}/{name}_layer_{index}"] = value
        return out

    def _sizes(self, group) -> Tuple[int, int]:
        """(layers, EP ranks) of the buffer: known sizes, else agreed by one MAX collective."""
        recorded = [i for v in self._sums.values() for i in v] + list(self._loads)
        local = 1 + max(recorded, default=-1)
        if self.num_layers is not None and local > self.num_layers:
            raise ValueError(
                f"a metric was recorded for layer index {local - 1} but num_layers="
                f"{self.num_layers}; pass C2RMetrics(num_layers=...) covering every layer"
            )
        local_p = max((t.shape[1] - 2 for t in self._loads.values()), default=0)
        if self.ep_size is not None and local_p > self.ep_size:
            raise ValueError(
                f"a layer recorded loads over {local_p} EP ranks but ep_size={self.ep_size}; "
                f"pass C2RMetrics(ep_size=...) with the model's EP size"
            )
        width = self.num_layers if self.num_layers is not None else local
        P = self.ep_size if self.ep_size is not None else local_p
        if group is None or (self.num_layers is not None and self.ep_size is not None):
            return width, P
        sizes = torch.tensor([width, P], dtype=torch.int64, device=self._table_device(group))
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        width, P = sizes.tolist()
        return width, P

    def _load_table(self, width: int, P: int, device: torch.device) -> torch.Tensor:
        """``[4, width, P + 2]`` fp64 on ``device``: each recorded layer's summed loads in its
        slot (one index_copy; layers over fewer EP ranks keep their columns), zeros elsewhere."""
        table = torch.zeros(len(LOAD_NAMES), width, P + 2, dtype=torch.float64, device=device)
        if not self._loads:
            return table
        index = sorted(self._loads)
        rows = []
        for i in index:
            loads = self._loads[i].to(device)
            p = loads.shape[1] - 2
            if p < P:  # slots after this layer's EP ranks stay empty
                pad = torch.zeros(loads.shape[0], P - p, dtype=loads.dtype, device=device)
                loads = torch.cat([loads[:, :p], pad, loads[:, p:]], dim=1)
            rows.append(loads)
        slots = torch.tensor(index, dtype=torch.int64).to(device)
        table.index_copy_(1, slots, torch.stack(rows, dim=1))
        return table

    def _table_device(self, group) -> torch.device:
        if group is not None:
            return torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        for sums in self._sums.values():
            for value in sums.values():
                if isinstance(value, torch.Tensor):
                    return value.device
        for loads in self._loads.values():
            return loads.device
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
        self._loads.clear()


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
