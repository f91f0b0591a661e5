"""A cluster cost model of one MoE layer: modeled forward+backward time from exact per-GPU row counts.

We can count rows exactly on CPU but cannot time InfiniBand there; this module turns the row counts
our dispatchers would ship into modeled seconds on a GPU cluster, for four ways of moving tokens:

    alltoall    Megatron's alltoall dispatcher: one row per (token, expert), one flat all-to-all
                over the EP group (NVLink to GPUs of the same node, InfiniBand to the others)
    deepep      flex + DeepEP-style normal kernels: one row per (token, destination node) over
                InfiniBand to the same-local-index GPU there, forwarded over NVLink to each
                destination GPU; both links work at once (one pipelined kernel)
    hybridep    flex + HybridEP (DeepEP's hybrid-ep branch): DeepEP's rows (IB hop to the
                same-local-rank GPU, then NVLink; the combine pre-reduced inside the node), the
                two hops overlapped chunk by chunk, at the achieved fraction of that bound its
                published EP16 H100 point gives (``LinkParams.hybridep_*_efficiency``,
                ``cost.calibration``)
    flat_dedup  ours, flat: one row per (token, destination GPU), one flat all-to-all
    two_level   ours, two-level: DeepEP's rows, as two all-to-alls one after the other

The model (docs/cost_model.md has its parameters' sources and its calibration):
    * per hop: time = latency + the busiest GPU's bytes (the larger of sent and received) / that
      link's bandwidth per GPU; latency = per-peer latency x peers the GPU exchanges rows with;
    * a flat all-to-all spanning nodes drives both links at once: time = latency + the larger of
      its InfiniBand and NVLink terms (likewise DeepEP's pipelined kernel); the two hops of our
      two-level dispatcher run one after the other: time = sum of the two hops;
    * forward + backward = four passes (dispatch, combine and their gradients) of the same rows;
      the forward dispatch also carries each method's metadata (probs, expert ids);
    * expert compute = the busiest GPU's expert-input rows x GEMM FLOPs per row (forward +
      backward) / an achieved GEMM throughput; identical for all methods under one routing;
    * with comm/compute overlap (Megatron's --overlap-moe-expert-parallel-comm, ideal) the layer
      takes max(comm, compute), without it comm + compute.

Row counts come from the counting functions the dispatchers size their all-to-alls with
(``comm.rows.count_send_rows`` for the flat ones, ``comm.two_level.build_count_table`` +
``plan_hops`` for the two-level path), evaluated for every GPU of the EP group: the model sees
exactly what the dispatcher would ship. Pure torch/numpy; no Megatron, no process group.

Shape suffixes: P GPUs of the EP group (= EP ranks), D nodes it spans, G GPUs per node (P = D*G),
T tokens per GPU, E experts, L experts per GPU (E/P), C count-table columns, K top-k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch

from megatron_c2r.comm.rows import count_send_rows
from megatron_c2r.comm.topology import NodeTopology
from megatron_c2r.comm.two_level import build_count_table, plan_hops
from megatron_c2r.cost.inputs import LinkParams, MoEShape
from megatron_c2r.files import write_text_atomic

METHODS = ("alltoall", "deepep", "hybridep", "flat_dedup", "two_level")
METHOD_LABELS = {
    "alltoall": "Megatron alltoall",
    "deepep": "flex+DeepEP-style",
    "hybridep": "flex+HybridEP",
    "flat_dedup": "ours flat dedup",
    "two_level": "ours two-level",
}
PASSES = 4  # forward dispatch, forward combine, and the two gradients (same rows, reversed)


# --------------------------------------------------------------------------------------------
# Row counts per GPU (from the dispatchers' own counting code)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkRows:
    """Rows each GPU sends and receives on each link in the forward dispatch (the combine sends
    the same rows back): int64 arrays [P]. Self rows (a GPU to itself) are on no link."""

    inter_sent_P: np.ndarray
    inter_recv_P: np.ndarray
    intra_sent_P: np.ndarray
    intra_recv_P: np.ndarray

    @property
    def busiest_inter(self) -> int:
        return int(max(self.inter_sent_P.max(), self.inter_recv_P.max()))

    @property
    def busiest_intra(self) -> int:
        return int(max(self.intra_sent_P.max(), self.intra_recv_P.max()))


@dataclass(frozen=True)
class RoutingCounts:
    """What one routing of P x T tokens costs each GPU, per method (``METHODS``; deepep,
    hybridep and two_level ship the same rows), plus the expert-input rows each GPU computes: int64 [P]."""

    shape: MoEShape
    rows: Dict[str, LinkRows]
    expert_rows_P: np.ndarray

    @property
    def tokens(self) -> int:
        return self.shape.ep_size * self.shape.tokens_per_gpu

    def inter_rows_per_token(self, method: str) -> float:
        """Rows per token that leave their node (the mean over the EP group's tokens)."""
        return float(self.rows[method].inter_sent_P.sum()) / max(self.tokens, 1)

    @property
    def load_max_over_mean(self) -> float:
        """The busiest GPU's expert-input rows over the mean (1.0 = perfectly balanced)."""
        mean = self.expert_rows_P.mean()
        return float(self.expert_rows_P.max() / mean) if mean > 0 else 1.0


class RowCounter:
    """Accumulates the count tables of the P GPUs of one routing, one GPU at a time (so P x T x E
    never sits in memory); :meth:`counts` turns them into per-GPU link rows."""

    def __init__(self, shape: MoEShape):
        self.shape = shape
        self._flat: List[np.ndarray] = []
        self._node: List[np.ndarray] = []

    def add(self, map_TE: torch.Tensor) -> None:
        """Count GPU ``len(self)``'s bool [T, E] routing map with its dispatchers' own code."""
        shape, rank = self.shape, len(self._flat)
        if rank >= shape.ep_size:
            raise ValueError(f"more than ep_size={shape.ep_size} routing maps: one per GPU")
        if tuple(map_TE.shape) != (shape.tokens_per_gpu, shape.num_experts):
            raise ValueError(
                f"routing map {rank} has shape {tuple(map_TE.shape)}, expected "
                f"[{shape.tokens_per_gpu}, {shape.num_experts}]"
            )
        P, G = shape.ep_size, shape.gpus_per_node
        self._flat.append(count_send_rows(map_TE, P).counts_PC.numpy())  # [P, 1 + L]
        topology = NodeTopology(ep_size=P, ranks_per_node=G, rank=rank)
        self._node.append(build_count_table(map_TE, topology).counts_PC.numpy())  # [P, G + L + 3]

    def __len__(self) -> int:
        return len(self._flat)

    def counts(self) -> RoutingCounts:
        shape = self.shape
        P, G = shape.ep_size, shape.gpus_per_node
        if len(self) != P:
            raise ValueError(f"got {len(self)} routing maps for ep_size={P}: one per GPU")
        flat_SPC, node_SPC = np.stack(self._flat), np.stack(self._node)
        megatron_SP = flat_SPC[:, :, 1:].sum(axis=2)  # source s -> GPU d, one per (token, expert)
        dedup_SP = flat_SPC[:, :, 0]  # one per (token, destination GPU)
        rows = {"alltoall": _flat_link_rows(megatron_SP, G),
                "flat_dedup": _flat_link_rows(dedup_SP, G)}  # fmt: skip
        rows["two_level"] = rows["deepep"] = rows["hybridep"] = _node_hop_rows(node_SPC, P, G)
        return RoutingCounts(shape=shape, rows=rows, expert_rows_P=megatron_SP.sum(axis=0))


def count_rows(routing_maps_TE: Iterable[torch.Tensor], shape: MoEShape) -> RoutingCounts:
    """Per-GPU rows of every method for one routing.

    Args:
        routing_maps_TE: P bool [T, E] routing maps, GPU (EP rank) 0 first, consumed one at a
            time.
        shape: the layer and its EP group.
    Returns:
        :class:`RoutingCounts`. Cold path (host ints). Each GPU's count tables are the ones its
        dispatcher would exchange; the per-GPU hop sizes are ``plan_hops`` of those tables.
    """
    counter = RowCounter(shape)
    for map_TE in routing_maps_TE:
        counter.add(map_TE)
    return counter.counts()


def _flat_link_rows(rows_SP: np.ndarray, G: int) -> LinkRows:
    """Split a flat all-to-all's [source, destination] rows into inter-/intra-node per GPU."""
    P = rows_SP.shape[0]
    node_P = np.arange(P) // G
    same_PP = node_P[:, None] == node_P[None, :]
    off_diag = same_PP & ~np.eye(P, dtype=bool)
    return LinkRows(
        inter_sent_P=np.where(~same_PP, rows_SP, 0).sum(axis=1),
        inter_recv_P=np.where(~same_PP, rows_SP, 0).sum(axis=0),
        intra_sent_P=np.where(off_diag, rows_SP, 0).sum(axis=1),
        intra_recv_P=np.where(off_diag, rows_SP, 0).sum(axis=0),
    )


def _node_hop_rows(node_SPC: np.ndarray, P: int, G: int) -> LinkRows:
    """Both hops of the two-level path per GPU, from ``plan_hops`` on each GPU's tables: hop 1
    (node rows to rail peers on other nodes) and hop 2 (rank rows inside the node, self rows
    excluded)."""
    out = {k: np.zeros(P, dtype=np.int64) for k in ("i_s", "i_r", "n_s", "n_r")}
    for rank in range(P):
        plan = plan_hops(node_SPC[rank].tolist(), node_SPC[:, rank].tolist(),
                         NodeTopology(ep_size=P, ranks_per_node=G, rank=rank))  # fmt: skip
        out["i_s"][rank], out["i_r"][rank] = sum(plan.hop1_send), sum(plan.hop1_recv)
        out["n_s"][rank] = sum(plan.hop2_send) - plan.hop2_send[rank]
        out["n_r"][rank] = sum(plan.hop2_recv) - plan.hop2_recv[rank]
    return LinkRows(out["i_s"], out["i_r"], out["n_s"], out["n_r"])


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerTime:
    """Modeled forward+backward time of one MoE layer (seconds) for one method and routing.

    inter_node_s / intra_node_s: the bandwidth terms of each link, summed over the passes.
    latency_s: the latency terms. comm_s: all-to-all time (for methods that drive both links at
    once this is less than the sum of the parts). compute_s: the busiest GPU's expert GEMMs.
    """

    method: str
    routing: str
    inter_node_s: float
    intra_node_s: float
    latency_s: float
    comm_s: float
    compute_s: float
    inter_rows_per_token: float
    load_max_over_mean: float

    @property
    def serial_s(self) -> float:
        """The layer without comm/compute overlap."""
        return self.comm_s + self.compute_s

    @property
    def overlap_s(self) -> float:
        """The layer with ideal comm/compute overlap across micro-batches."""
        return max(self.comm_s, self.compute_s)


def metadata_columns(method: str, shape: MoEShape) -> tuple:
    """Metadata columns per row on (inter-node, intra-node) rows in the forward dispatch:
    Megatron ships one prob per (token, expert) row; our flat rows carry 2S (S = min(k, L) probs
    and local ids); node rows 2V (V = min(k, experts per node)), relayed rank rows 2S + 1 (the
    source rank too); DeepEP-style and HybridEP rows are assumed to carry what our node rows
    carry."""
    k, L = shape.topk, shape.experts_per_gpu
    S, V = min(k, L), min(k, L * shape.gpus_per_node)
    return {
        "alltoall": (1, 1),
        "flat_dedup": (2 * S, 2 * S),
        "two_level": (2 * V, 2 * S + 1),
        "deepep": (2 * V, 2 * V),
        "hybridep": (2 * V, 2 * V),
    }[method]


def pass_time(
    method: str, inter_bytes: float, intra_bytes: float, nodes: int, gpus_per_node: int,
    params: LinkParams, kernel: str = "dispatch",
) -> tuple:
    """One all-to-all pass of ``method``: ``(seconds, inter-node term, intra-node term,
    latency)`` for the busiest GPU's bytes on each link (the larger of sent and received).

    Latency: per-peer latency x peers: a flat all-to-all exchanges with every GPU of the other
    nodes over InfiniBand, the node-row methods with one rail peer per other node; both with
    the G - 1 GPUs of their node over NVLink. ``two_level`` runs its hops one after the other
    (sum); the others drive both links at once (max). ``hybridep`` divides that max by its
    achieved efficiency for ``kernel`` ('dispatch' or 'combine': the forward dispatch and the
    combine's gradient run the dispatch kernel, the others the combine kernel)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    flat = method in ("alltoall", "flat_dedup")
    inter_peers = (nodes - 1) * gpus_per_node if flat else nodes - 1
    latency = 1e-6 * (params.ib_latency_us * inter_peers
                      + params.nvlink_latency_us * (gpus_per_node - 1))  # fmt: skip
    inter_s, intra_s = inter_bytes / (params.ib_gbps * 1e9), intra_bytes / (params.nvlink_gbps * 1e9)
    both = inter_s + intra_s if method == "two_level" else max(inter_s, intra_s)
    if method == "hybridep":
        both /= (params.hybridep_dispatch_efficiency if kernel == "dispatch"
                 else params.hybridep_combine_efficiency)  # fmt: skip
    return latency + both, inter_s, intra_s, latency


def layer_time(counts: RoutingCounts, method: str, params: LinkParams, routing: str = "") -> LayerTime:
    """The model of the module docstring for one method on one routing's counts."""
    shape, rows = counts.shape, counts.rows[method]
    hidden_bytes = shape.hidden * params.bytes_per_element
    meta_inter, meta_intra = metadata_columns(method, shape)
    inter_total = intra_total = latency_total = comm = 0.0
    for pass_index in range(PASSES):
        meta = pass_index == 0  # only the forward dispatch carries metadata
        # Passes: forward dispatch, forward combine, combine's gradient (a dispatch), dispatch's
        # gradient (a combine).
        kernel = "dispatch" if pass_index in (0, 2) else "combine"
        seconds, inter_s, intra_s, latency = pass_time(
            method,
            rows.busiest_inter * (hidden_bytes + meta * meta_inter * params.meta_bytes),
            rows.busiest_intra * (hidden_bytes + meta * meta_intra * params.meta_bytes),
            shape.nodes, shape.gpus_per_node, params, kernel,
        )  # fmt: skip
        comm += seconds
        inter_total, intra_total = inter_total + inter_s, intra_total + intra_s
        latency_total += latency
    compute = float(counts.expert_rows_P.max()) * shape.flops_per_row / (params.gemm_tflops * 1e12)
    return LayerTime(
        method=method, routing=routing, inter_node_s=inter_total, intra_node_s=intra_total,
        latency_s=latency_total, comm_s=comm, compute_s=compute,
        inter_rows_per_token=counts.inter_rows_per_token(method),
        load_max_over_mean=counts.load_max_over_mean,
    )  # fmt: skip


def estimate(
    counts_by_routing: Dict[str, RoutingCounts], params: LinkParams, baseline_routing: str
) -> List[dict]:
    """Every method under every routing, as rows of plain numbers, with the ratios of comm time
    and layer time to Megatron alltoall and to DeepEP-style under ``baseline_routing`` (the
    config's own routing: what the user runs today)."""
    base = counts_by_routing[baseline_routing]
    ref = {m: layer_time(base, m, params, baseline_routing) for m in ("alltoall", "deepep")}
    out = []
    for routing, counts in counts_by_routing.items():
        for method in METHODS:
            t = layer_time(counts, method, params, routing)
            out.append(dict(
                method=method, label=METHOD_LABELS[method], routing=routing,
                inter_node_ms=1e3 * t.inter_node_s, intra_node_ms=1e3 * t.intra_node_s,
                latency_ms=1e3 * t.latency_s, comm_ms=1e3 * t.comm_s,
                compute_ms=1e3 * t.compute_s, layer_serial_ms=1e3 * t.serial_s,
                layer_overlap_ms=1e3 * t.overlap_s,
                comm_vs_alltoall=t.comm_s / ref["alltoall"].comm_s,
                comm_vs_deepep=t.comm_s / ref["deepep"].comm_s,
                layer_serial_vs_alltoall=t.serial_s / ref["alltoall"].serial_s,
                layer_overlap_vs_alltoall=t.overlap_s / ref["alltoall"].overlap_s,
                layer_serial_vs_deepep=t.serial_s / ref["deepep"].serial_s,
                inter_node_rows_per_token=t.inter_rows_per_token,
                load_max_over_mean=t.load_max_over_mean,
            ))  # fmt: skip
    return out


def format_table(rows: Sequence[dict]) -> str:
    """The ``estimate`` table: one line per (routing, method)."""
    head = (f"{'method':<19} {'routing':<30} {'inter':>7} {'intra':>7} {'comm':>7} {'expert':>7} "
            f"{'layer':>7} {'overlap':>7} {'comm/a2a':>8} {'comm/DeepEP':>11} {'layer/a2a':>9} "
            f"{'IB rows/tok':>11} {'load':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['label']:<19} {r['routing'][:30]:<30} {r['inter_node_ms']:7.3f} "
            f"{r['intra_node_ms']:7.3f} {r['comm_ms']:7.3f} {r['compute_ms']:7.3f} "
            f"{r['layer_serial_ms']:7.3f} {r['layer_overlap_ms']:7.3f} "
            f"{r['comm_vs_alltoall']:7.2f}x {r['comm_vs_deepep']:10.2f}x "
            f"{r['layer_serial_vs_alltoall']:8.2f}x {r['inter_node_rows_per_token']:11.3f} "
            f"{r['load_max_over_mean']:5.2f}"
        )
    lines.append(
        "(modeled ms per MoE layer, forward+backward: inter = InfiniBand term, intra = NVLink "
        "term, comm = all-to-all time, expert = busiest GPU's GEMMs, layer = comm + expert, "
        "overlap = max(comm, expert); ratios to the config's routing; load = busiest GPU's "
        "expert rows / mean)"
    )
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory + rename)."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n", prefix=".estimate-")
