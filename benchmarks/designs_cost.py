"""MoGE and BigMac in the cluster cost model (issue 18): modeled MoE-layer time and bytes per
token next to the usual routing and our node-anchored routing, on one shape and node count.

    python benchmarks/designs_cost.py                  # DeepSeek-V3-like, 8 nodes x 8 GPUs
    python benchmarks/designs_cost.py --shape qwen3 --nodes 4 --dispatch-dims 2048 1024

Everything here is MODELED (``megatron_c2r.cost.model``, the parameters and calibration of
docs/cost_model.md, the same code as ``benchmarks/cluster_model.py`` and ``megatron-c2r
estimate``); row counts are exact, from the dispatchers' counting code on sampled tokens with iid
router scores. Routings:

    usual            the shape's usual routing (DeepSeek-V3-like: Megatron's group-limited 4 of 8)
    node-anchored    ours, M=1 node per token (c2r.mode: node)
    MoGE over nodes  c2r.mode: group_balanced with groups = nodes: k/N experts from every node
                     (needs N | k), perfect node balance by construction
    MoGE over GPUs   groups = EP ranks: k/P per GPU (needs P | k; skipped otherwise)

Each at the model width H and with BigMac (``c2r.dispatch_dim`` d): rows are d wide, experts run
at d with the FFN width F' = (k 3 H F - 2 H d) / (k 3 d) that keeps active parameters equal
(docs/designs.md); the two H <-> d projections (2 T H d FLOPs each way, on every GPU) are not in
the layer time, as in ``estimate``. Ratios are against Megatron alltoall and DeepEP-style with the
usual routing at width H.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.cluster_model import SHAPES, shape_at, write_atomic  # noqa: E402 - script use
from megatron_c2r.cost.inputs import LinkParams, RoutingRule, RoutingSource, node_anchored  # noqa: E402
from megatron_c2r.cost.model import estimate  # noqa: E402
from megatron_c2r.cost.routing import sample_counts  # noqa: E402


def equal_active_ffn(topk: int, hidden: int, ffn: int, d: int) -> int:
    """F' at dispatch width d with the plain layer's active expert parameters (SwiGLU)."""
    return round((topk * 3 * hidden * ffn - 2 * hidden * d) / (topk * 3 * d))


def designs(name: str, nodes: int, tokens: int, dims: list, params: LinkParams, seed: int) -> dict:
    shape = shape_at(name, nodes, tokens)
    label, _, k, hidden, ffn, score_function, usual = SHAPES[name]
    rules = {usual.label: usual, "node-anchored M=1": node_anchored(shape.nodes, 1)}
    skipped = []
    for groups, where in ((shape.nodes, "nodes"), (shape.ep_size, "GPUs")):
        rule = RoutingRule(f"MoGE over {where} (k/{groups} each)", groups, groups, balanced=True)
        if k % groups:
            skipped.append(f"{rule.label}: {groups} {where} do not divide k={k}")
        else:
            rules[rule.label] = rule
    counts = sample_counts(RoutingSource("uniform"), shape, rules, seed=seed,
                           score_function=score_function)  # fmt: skip
    # BigMac: the same routing (the router scores full-width tokens), rows and experts at d.
    for d in dims:
        narrow = dataclasses.replace(shape, hidden=d, ffn_hidden=equal_active_ffn(k, hidden, ffn, d))
        for routing in list(rules):
            counts[f"{routing} + BigMac d={d}"] = dataclasses.replace(counts[routing], shape=narrow)
    rows = estimate(counts, params, usual.label)
    return dict(shape=name, label=label, nodes=nodes, ep_size=shape.ep_size, hidden=hidden,
                tokens_per_gpu=tokens, usual=usual.label, dims=dims, skipped=skipped, rows=rows,
                params=dataclasses.asdict(params))  # fmt: skip


def markdown(result: dict) -> str:
    params = LinkParams(**result["params"])
    lines = [
        f"Modeled, {result['label']}, {result['nodes']} nodes (EP {result['ep_size']}), "
        f"{result['tokens_per_gpu']} tokens per GPU, iid scores, NVLink {params.nvlink_gbps:g} / "
        f"IB {params.ib_gbps:g} GB/s per GPU, {params.bytes_per_element:g} bytes per element. "
        "Comm = forward+backward all-to-all of one MoE layer; layer = comm + expert GEMMs on the "
        "busiest GPU (no overlap); ratios against Megatron alltoall / DeepEP-style with the usual "
        "routing at full width. IB KiB/token = rows per token leaving the node x row width x "
        "bytes per element (dispatch; combine returns the same).",
        "",
        "| routing | dispatcher | IB rows/token | IB KiB/token | comm ms | comm vs alltoall | "
        "comm vs DeepEP-style | busiest GPU / mean | layer vs alltoall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        if r["method"] not in ("alltoall", "deepep", "two_level"):
            continue
        width = result["hidden"]
        for d in result["dims"]:
            if r["routing"].endswith(f"BigMac d={d}"):
                width = d
        kib = r["inter_node_rows_per_token"] * width * params.bytes_per_element / 1024
        lines.append(
            f"| {r['routing']} | {r['label']} | {r['inter_node_rows_per_token']:.2f} | {kib:.1f} | "
            f"{r['comm_ms']:.2f} | {r['comm_vs_alltoall']:.2f}x | {r['comm_vs_deepep']:.2f}x | "
            f"{r['load_max_over_mean']:.3f} | {r['layer_serial_vs_alltoall']:.2f}x |"
        )
    for line in result["skipped"]:
        lines.append(f"\nNot applicable: {line}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="deepseek_v3", choices=list(SHAPES))
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--tokens-per-gpu", type=int, default=4096)
    parser.add_argument("--dispatch-dims", type=int, nargs="*", default=None,
                        help="BigMac widths d (default H/2 and H/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    hidden = SHAPES[args.shape][3]
    dims = args.dispatch_dims if args.dispatch_dims is not None else [hidden // 2, hidden // 4]
    if args.nodes < 1 or args.tokens_per_gpu < 1 or any(not 1 <= d <= hidden for d in dims):
        print(f"designs_cost.py: error: --nodes {args.nodes} and --tokens-per-gpu "
              f"{args.tokens_per_gpu} must be >= 1 and --dispatch-dims {dims} in [1, H={hidden}]",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(1)
    result = designs(args.shape, args.nodes, args.tokens_per_gpu, dims, LinkParams(), args.seed)
    print(markdown(result))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"designs_cost_{args.shape}_{args.nodes}n.json")
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
