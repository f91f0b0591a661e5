"""Token-balanced and hierarchical placement: the locality/balance trade-off, measured.

    python benchmarks/placement_balance.py --collab /tmp/g2run/collaboration.npy --oracle
    (the .npy: `python -m megatron_c2r train --config configs/tiny_cpu.yaml --steps 80
     --out /tmp/g2run --no-progress`; without --collab only the synthetic rows are measured)

For each routing and shape: distinct EP ranks (and nodes) per token and the busiest rank's
(node's) expected tokens over the mean, for Megatron's identity layout, random placements and
the planner at --max-load-imbalance off / 1.25 / 1.10 / 1.05, and the planner's CPU time per
layer. Synthetic routing: planted clusters whose topics are Zipf(1)-popular (a few popular
clusters carry most tokens, as trained routers do), full top-k traces (ranks/token exact).
The CPU job's data: its trackers' co-activation counts (ranks/token estimated from pair
counts); with --oracle, every balanced partition of its 16 experts is enumerated to give the
best achievable locality under each bound, and the planner's gap to it.
Markdown on stdout (the tables in docs/placement.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_c2r.placement.exhaustive import balanced_partitions  # noqa: E402
from megatron_c2r.placement.partition import ranks_per_token_estimate  # noqa: E402
from megatron_c2r.placement.planner import PlannerConfig, expert_load_E, plan_layer  # noqa: E402
from megatron_c2r.placement.sources import LayerCollab, load_collaboration  # noqa: E402

BOUNDS = (None, 1.25, 1.1, 1.05)
# name, E, k, P, nodes, clusters
SHAPES = [("16e top-4", 16, 4, 4, 1, 4), ("64e top-8", 64, 8, 8, 1, 8),
          ("256e top-8", 256, 8, 8, 1, 16), ("256e top-8", 256, 8, 64, 8, 16)]


def skewed_top_indices(num_experts, top_k, num_tokens, num_clusters, strength, skew, seed):
    """int64 [T, K]: planted clusters whose topics are Zipf(skew)-popular, so experts' loads are
    unequal and a locality-only placement piles the popular clusters onto few ranks."""
    rng = np.random.default_rng(seed)
    cluster_E = rng.permutation(np.arange(num_experts) % num_clusters)
    popularity = 1.0 / np.arange(1, num_clusters + 1) ** skew
    topic_T = rng.choice(num_clusters, num_tokens, p=popularity / popularity.sum())
    logits_TE = rng.standard_normal((num_tokens, num_experts))
    logits_TE += strength * (cluster_E[None, :] == topic_T[:, None])
    return np.argpartition(-logits_TE, top_k - 1, axis=1)[:, :top_k]


def measure(layers, ep_size, num_nodes, seed=0):
    """{bound: mean over layers of each prediction, + CPU seconds per layer}."""
    out = {}
    for bound in BOUNDS:
        config = PlannerConfig(ep_size=ep_size, num_nodes=num_nodes, max_load_imbalance=bound,
                               seed=seed)
        start = time.process_time()
        plans = [plan_layer(layer, config) for layer in layers]
        seconds = (time.process_time() - start) / len(layers)
        row = {"seconds": seconds, "plans": plans}
        for field in ("predicted_ranks_per_token", "predicted_busiest_rank_load",
                      "predicted_nodes_per_token", "predicted_busiest_node_load"):
            if getattr(plans[0], field) is not None:
                row[field] = {k: float(np.mean([getattr(p, field)[k] for p in plans]))
                              for k in ("identity", "random", "planned")}
        if bound is not None:
            row["smallest"] = max(p.load_bound["smallest_rank"] for p in plans)
        out[bound] = row
    return out


def _cell(row, key, level="rank"):
    per_token = row[f"predicted_{level}s_per_token"][key]
    return f"{per_token:.2f} ({row[f'predicted_busiest_{level}_load'][key]:.2f}x)"


def table_rows(label, shape, result, num_nodes):
    """Markdown rows: one per level (ranks, and nodes for hierarchical plans)."""
    off = result[None]
    levels = ["node", "rank"] if num_nodes > 1 else ["rank"]
    rows = []
    for level in levels:
        cells = [_cell(off, "identity", level), _cell(off, "random", level)]
        cells += [_cell(result[b], "planned", level) for b in BOUNDS]
        what = f"{level}s/token (busiest {level})"
        rows.append(f"| {label} | {shape} | {what} | " + " | ".join(cells) + " |")
    return rows


def flat_nodes_row(layers, ep_size, num_nodes, shape):
    """Nodes per token (busiest node) of flat plans over ``ep_size`` ranks, node = G ranks."""
    from megatron_c2r.placement.partition import busiest_over_mean
    from megatron_c2r.placement.planner import predicted_ranks_per_token

    per_node = ep_size // num_nodes
    cells = []
    for bound in BOUNDS:
        config = PlannerConfig(ep_size=ep_size, max_load_imbalance=bound)
        e2n = [np.asarray(plan_layer(layer, config).expert_to_rank) // per_node for layer in layers]
        nodes = np.mean([predicted_ranks_per_token(layer, e) for layer, e in zip(layers, e2n)])
        busy = np.mean([busiest_over_mean(expert_load_E(layer), e, num_nodes)
                        for layer, e in zip(layers, e2n)])
        cells.append(f"{nodes:.2f} ({busy:.2f}x)")
    return f"| flat plan, cut into nodes | {shape} | nodes/token (busiest node) | | | " + \
        " | ".join(cells) + " |"


def oracle_gap(layer, ep_size, plans_by_bound):
    """Max over bounds of the planner's shortfall in within-group pairs (the objective on
    matrices) and in estimated ranks/token, against every balanced partition."""
    parts_CE = np.stack(list(balanced_partitions(layer.num_experts, ep_size)))
    load_E = expert_load_E(layer)
    pairs_C, busy_C = np.empty(len(parts_CE)), np.empty(len(parts_CE))
    for s in range(0, len(parts_CE), 1 << 16):
        onehot_CEP = (parts_CE[s:s + (1 << 16), :, None] == np.arange(ep_size)).astype(float)
        within_CP = np.einsum("cep,cep->cp", onehot_CEP, layer.counts_EE @ onehot_CEP)
        pairs_C[s:s + len(onehot_CEP)] = within_CP.sum(axis=1) / 2
        busy_C[s:s + len(onehot_CEP)] = (np.einsum("e,cep->cp", load_E, onehot_CEP).max(axis=1)
                                         / (load_E.sum() / ep_size))
    gaps = []
    for bound, plan in plans_by_bound.items():
        cap = busy_C.max() if bound is None else max(bound, busy_C.min())
        ok_C = busy_C <= cap * (1 + 1e-9)
        best = int(np.flatnonzero(ok_C)[np.argmax(pairs_C[ok_C])])
        e2r = np.asarray(plan.expert_to_rank)
        got = (np.equal.outer(e2r, e2r) * layer.counts_EE).sum() / 2
        est_best = ranks_per_token_estimate(layer.counts_EE, parts_CE[best], layer.top_k)
        gaps.append((1 - got / pairs_C[best],
                     plan.predicted_ranks_per_token["planned"] / est_best - 1))
    return max(g[0] for g in gaps), max(g[1] for g in gaps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collab", help="the CPU job's collaboration.npy (top-4, 16 experts)")
    ap.add_argument("--tokens", type=int, default=20000, help="synthetic tokens per layer")
    ap.add_argument("--layers", type=int, default=2, help="synthetic layers per shape (seeds)")
    ap.add_argument("--oracle", action="store_true",
                    help="brute-force the CPU job's data at P=2 and P=4 (minutes at P=4)")
    args = ap.parse_args(argv)

    head = ("| routing | shape | level | identity | random | planned, off | 1.25 | 1.10 | "
            "1.05 |\n|---|---|---|---|---|---|---|---|---|")
    rows, times = [], []
    for name, num_experts, top_k, ep_size, num_nodes, clusters in SHAPES:
        layers = [LayerCollab.from_top_indices(
            skewed_top_indices(num_experts, top_k, args.tokens, clusters, 2.0, 1.0, seed),
            num_experts) for seed in range(args.layers)]
        shape = f"{name}, EP {ep_size}" + (f" = {num_nodes} nodes x {ep_size // num_nodes}"
                                            if num_nodes > 1 else "")
        result = measure(layers, ep_size, num_nodes)
        rows += table_rows("synthetic, Zipf-1 clusters", shape, result, num_nodes)
        times.append((shape, result))
        if num_nodes > 1:  # the same EP size planned flat, its ranks cut into nodes
            rows.append(flat_nodes_row(layers, ep_size, num_nodes, shape))
    if args.collab:
        layers = load_collaboration(args.collab, top_k=4)
        for ep_size, num_nodes in ((2, 1), (4, 1), (4, 2)):
            shape = f"16e top-4, EP {ep_size}" + (f" = {num_nodes} nodes x {ep_size // num_nodes}"
                                                   if num_nodes > 1 else "")
            result = measure(layers, ep_size, num_nodes)
            rows += table_rows(f"CPU job, {len(layers)} layers", shape, result, num_nodes)
            times.append((shape + " (CPU job)", result))
            if args.oracle and num_nodes == 1:
                gaps = [oracle_gap(layer, ep_size, {b: result[b]["plans"][i] for b in BOUNDS})
                        for i, layer in enumerate(layers)]
                print(f"oracle, EP {ep_size}: worst gap over {len(layers)} layers and bounds "
                      f"off/1.25/1.10/1.05: {100 * max(g[0] for g in gaps):.2f}% of within-group "
                      f"pairs, {100 * max(g[1] for g in gaps):+.2f}% estimated ranks/token",
                      file=sys.stderr)
    print("Cells: per token (busiest / mean). Planned columns at each --max-load-imbalance.\n")
    print(head + "\n" + "\n".join(rows))
    print("\n| shape | smallest achievable busiest rank (max over layers) | CPU s/layer: off | "
          "1.25 | 1.10 | 1.05 |\n|---|---|---|---|---|---|")
    for shape, result in times:
        print(f"| {shape} | {result[1.05]['smallest']:.3f} | "
              + " | ".join(f"{result[b]['seconds']:.2f}" for b in BOUNDS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
