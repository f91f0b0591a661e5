"""Calibration of the cluster cost model against published all-to-all measurements.

Each point re-creates a published benchmark's setting in the model (same GPUs per node, tokens,
hidden size, routing rule, bytes on the wire, and the benchmark's own definition of bandwidth),
runs the model's per-pass time (``cost.model.pass_time``) on row counts from the dispatchers'
counting code, and compares. Sources (docs/cost_model.md has the links):

    DeepEP V1 normal kernels, H800 + CX7 (DeepEP's docs/legacy.md table, test_internode.py):
        4096 tokens per GPU, hidden 7168, 256 experts top-8, tokens limited to min(nodes, 4)
        nodes (node score = the node's best expert score), FP8 dispatch (1 byte + one fp32
        scale per 128 elements). "Bottleneck bandwidth" = the rank's logical bytes (one copy
        per (token, destination node), its own node included) / kernel time:
        intranode EP8 153 GB/s (NVLink bytes received, self included); internode EP16 43,
        EP32 58, EP64 51 GB/s (RDMA).
    NCCL alltoall_perf (nccl-tests; busBw = size / time x (n - 1) / n):
        64 x H800 (8 nodes), 8 MiB: 24.44 GB/s (NVIDIA/nccl issue 1531, out-of-place);
        4 x H100 (one node, NVLink), 500 MiB: 334.9 GB/s (NVIDIA/nccl issue 2169, the run
        without the slowdown that issue is about).

    HybridEP (DeepEP's hybrid-ep branch, docs/Hybrid-EP_Implementation.md; our shared reference
    notes section 11): H100, 4096 tokens per GPU, hidden 7168, top-8, EP16 (2 nodes): dispatch
    76.8 GB/s, combine 68.0 GB/s (kernel), BF16. Its bandwidth is taken in DeepEP's definition
    (its test harness derives from DeepEP's: one copy per (token, destination node), own node
    included, over the kernel time) on 256 experts routed as DeepEP's test routes them; both
    are assumptions the published figure does not state. Above the NIC's 48 GB/s because the
    token's own-node copy never crosses InfiniBand.

Two points set a parameter (``role`` 'sets ...'), the others check the model (``role`` 'check'):
    * H800 NVLink: DeepEP states "~160 GB/s NVLink maximum"; its intranode EP8 measurement
      (153 GB/s logical, of which the GPU's own 1/8 never crosses a link) implies ~136 GB/s
      achieved per direction, and the model at 160 overshoots the NVLink-bound EP16 point by
      27%: the H800 parameters use 136 GB/s, the same CX7 NIC as H100 (48 GB/s).
    * HybridEP's dispatch and combine efficiencies (``LinkParams.hybridep_*_efficiency``): its
      published EP16 H100 bandwidth over the model's bound for the same setting at efficiency 1
      (H100 links: IB-bound there). The defaults are these two ratios; a unit test recomputes
      them.
    * InfiniBand per-peer latency (3.1 us, the default): the NCCL 8 MiB point, the only
      latency-bound one (128 KiB per peer); from bandwidth alone the model says 54 GB/s.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List

import torch

from megatron_c2r.cost.inputs import LinkParams, MoEShape
from megatron_c2r.cost.model import count_rows, pass_time
from megatron_c2r.cost.routing import routing_map

H100 = LinkParams()
H800 = dataclasses.replace(H100, nvlink_gbps=136.0)  # set from DeepEP's intranode EP8 point (above)
FP8_BYTES = 1 + 4 / 128  # DeepEP's FP8 dispatch: e4m3 values + one fp32 scale per 128 (its fp8_factor)
DEEPEP_PUBLISHED = {8: 153.0, 16: 43.0, 32: 58.0, 64: 51.0}  # GB/s, dispatch, legacy.md table
DEEPEP_ROLE = {8: "sets H800 nvlink_gbps"}
HYBRIDEP_PUBLISHED = {"dispatch": 76.8, "combine": 68.0}  # GB/s, EP16 H100, BF16, kernel
NCCL_PUBLISHED = [  # (label, nodes, GPUs per node, bytes, published busBw GB/s, params, role)
    ("NCCL alltoall 64 x H800 (8 nodes), 8 MiB", 8, 8, 8 << 20, 24.44, "H800", "sets ib_latency_us"),
    ("NCCL alltoall 4 x H100 (1 node), 500 MiB", 1, 4, 524_288_000, 334.9, "H100", "check"),
]


def deepep_shape(ep: int, tokens: int = 4096) -> MoEShape:
    """DeepEP's benchmark layer: 256 experts top-8, hidden 7168, 8 GPUs per node."""
    gpus = min(ep, 8)
    return MoEShape(num_experts=256, topk=8, hidden=7168, ffn_hidden=2048, ep_size=ep,
                    gpus_per_node=gpus, tokens_per_gpu=tokens)  # fmt: skip


def deepep_routing_maps(shape: MoEShape, seed: int = 0) -> Iterator[torch.Tensor]:
    """DeepEP test_internode.py's routing per GPU: scores |N(0,1)| + 1; nodes ranked by their
    best expert score, the top min(nodes, 4) kept; top-k inside them."""
    T, E, D = shape.tokens_per_gpu, shape.num_experts, shape.nodes
    keep = min(D, 4)
    for rank in range(shape.ep_size):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
        scores_TE = torch.randn(T, E, generator=gen).abs() + 1
        node_scores_TD = scores_TE.view(T, D, -1).amax(dim=-1)
        kept_TD = torch.zeros(T, D, dtype=torch.bool).scatter_(
            1, node_scores_TD.topk(keep, dim=-1).indices, True
        )
        masked_TE = scores_TE.masked_fill(~kept_TD.repeat_interleave(E // D, dim=1), 0.0)
        yield routing_map(masked_TE.topk(shape.topk, dim=-1).indices, E)


def deepep_dispatch_gbps(ep: int, params: LinkParams = H800, tokens: int = 4096, *,
                         method: str = "deepep", row_bytes_per_element: float = FP8_BYTES,
                         kernel: str = "dispatch") -> float:
    """Modeled DeepEP "bottleneck bandwidth" of one dispatch at EP ``ep`` (GB/s, DeepEP's own
    definition: the rank's logical bytes / the dispatch time; the time is the busiest GPU's).
    ``method='hybridep'`` with ``kernel``: the same quantity for HybridEP's dispatch or combine
    (the combine moves the same rows back)."""
    shape = deepep_shape(ep, tokens)
    maps = list(deepep_routing_maps(shape))
    counts = count_rows(iter(maps), shape)
    rows = counts.rows[method]
    row_bytes = shape.hidden * row_bytes_per_element
    seconds = pass_time(method, rows.busiest_inter * row_bytes, rows.busiest_intra * row_bytes,
                        shape.nodes, shape.gpus_per_node, params, kernel)[0]  # fmt: skip
    if shape.nodes == 1:  # intranode: bytes each GPU receives over NVLink, its own included
        logical_rows = _received_rank_rows(maps, shape)
    else:  # internode: one copy per (token, destination node), the token's own node included
        per_node = shape.num_experts // shape.nodes
        logical_rows = sum(
            m.view(shape.tokens_per_gpu, shape.nodes, per_node).any(dim=2).sum().item() for m in maps
        ) / shape.ep_size
    return logical_rows * row_bytes / seconds / 1e9


def hybridep_efficiencies(tokens: int = 4096) -> dict:
    """HybridEP's published EP16 H100 dispatch / combine GB/s over the model's at efficiency 1
    (the values ``LinkParams.hybridep_*_efficiency`` default to)."""
    ideal = dataclasses.replace(H100, hybridep_dispatch_efficiency=1.0,
                                hybridep_combine_efficiency=1.0)  # fmt: skip
    return {kernel: published / deepep_dispatch_gbps(16, ideal, tokens, method="hybridep",
                                                     row_bytes_per_element=2.0, kernel=kernel)
            for kernel, published in HYBRIDEP_PUBLISHED.items()}  # fmt: skip


def _received_rank_rows(maps: List[torch.Tensor], shape: MoEShape) -> float:
    """Mean over GPUs of the rows a GPU receives, one per (token, this GPU), self included."""
    L = shape.experts_per_gpu
    total = sum(m.view(shape.tokens_per_gpu, shape.ep_size, L).any(dim=2).sum().item() for m in maps)
    return total / shape.ep_size


def nccl_alltoall_busbw(nodes: int, gpus_per_node: int, size_bytes: int, params: LinkParams) -> float:
    """Modeled nccl-tests alltoall busBw (GB/s): every GPU sends ``size_bytes / n`` to each of
    the n GPUs (itself included); one flat all-to-all pass."""
    n = nodes * gpus_per_node
    chunk = size_bytes / n
    seconds = pass_time("alltoall", chunk * (n - gpus_per_node), chunk * (gpus_per_node - 1),
                        nodes, gpus_per_node, params)[0]  # fmt: skip
    return size_bytes / seconds / 1e9 * (n - 1) / n


def calibration_rows(deepep_tokens: int = 4096) -> List[dict]:
    """Every published point with the model's value: label, published, modeled, ratio, role.
    ``deepep_tokens``: tokens per GPU of the DeepEP points (4096 as published; fewer for a quick
    check: bandwidth-bound, so the ratio barely moves)."""
    params = {"H100": H100, "H800": H800}
    rows = []
    for ep, published in DEEPEP_PUBLISHED.items():
        where = "intranode (NVLink)" if ep == 8 else "internode (RDMA)"
        modeled = deepep_dispatch_gbps(ep, tokens=deepep_tokens)
        rows.append(dict(label=f"DeepEP V1 dispatch EP{ep} H800, {where}", published=published,
                         modeled=modeled, ratio=modeled / published,
                         role=DEEPEP_ROLE.get(ep, "check")))  # fmt: skip
    for kernel, published in HYBRIDEP_PUBLISHED.items():
        modeled = deepep_dispatch_gbps(16, H100, deepep_tokens, method="hybridep",
                                       row_bytes_per_element=2.0, kernel=kernel)  # fmt: skip
        rows.append(dict(label=f"HybridEP {kernel} EP16 H100 (2 nodes), BF16", published=published,
                         modeled=modeled, ratio=modeled / published,
                         role=f"sets hybridep_{kernel}_efficiency"))  # fmt: skip
    for label, nodes, gpus, size, published, name, role in NCCL_PUBLISHED:
        modeled = nccl_alltoall_busbw(nodes, gpus, size, params[name])
        bandwidth_only = nccl_alltoall_busbw(
            nodes, gpus, size, dataclasses.replace(params[name], ib_latency_us=0.0,
                                                   nvlink_latency_us=0.0)
        )  # fmt: skip
        rows.append(dict(label=label, published=published, modeled=modeled,
                         ratio=modeled / published, bandwidth_only=bandwidth_only, role=role))  # fmt: skip
    return rows


def format_calibration(rows: List[dict]) -> str:
    """A markdown table of ``calibration_rows``."""
    lines = ["| measurement | published GB/s | modeled GB/s | modeled / published | role |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        extra = (f" (bandwidth terms only: {r['bandwidth_only']:.1f})"
                 if "bandwidth_only" in r else "")  # fmt: skip
        lines.append(f"| {r['label']} | {r['published']:.1f} | {r['modeled']:.1f}{extra} | "
                     f"{r['ratio']:.2f} | {r['role']} |")  # fmt: skip
    return "\n".join(lines)
