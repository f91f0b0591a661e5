"""Rows and bytes per token of the two published designs next to ours (issue 18): MoGE
group-balanced routing (``c2r.mode: group_balanced``) at the balance end, our anchored group
routing (M=1) at the locality end, plain top-k in between; and BigMac's low-dimensional dispatch
(``c2r.dispatch_dim``) as bytes per token at d/H = 1, 1/2, 1/4.

    python benchmarks/designs_volume.py                       # 16e4 and 64e8, EP 2/4/8, ~1 min
    python benchmarks/designs_volume.py --shapes 16e4 64e8 256e8 --hidden 7168

What is measured, per (shape, EP size P, routing source, rule):
    ranks/token      distinct destination EP ranks per token = rows our dedup dispatcher ships
    remote rows/tok  of those, rows to other ranks (each token's source rank: tokens split
                     evenly over the P ranks); Megatron's alltoall ships k rows per token
    busiest/mean     the busiest rank's (token, expert) pairs over the mean: what an EP step
                     waits for (1.00 = perfect balance)
    bytes/token      remote bytes of one MoE layer's dispatch + combine, per token, with bf16
                     hidden states and fp32 metadata, the dispatchers' own accounting
                     (``comm.stats_from_counts``): ours rows x (2d + 8S) + rows x 2d (S = min(k,
                     E/P) metadata slots), Megatron's alltoall k-rows x (2H + 4) + k-rows x 2H
Rows come from ``comm.count_rows`` (tested equal to the dispatcher's counters over real gloo
all-to-alls, ``tests/distributed/test_dispatcher_volume.py``) on routing maps built by the
router's own selection functions. BigMac leaves routing unchanged (the router scores the
full-width token), so its bytes are the same rows at width d.

Routing sources: ``uniform`` (i.i.d. Gaussian logits, 8192 tokens) and ``trained`` (router logits
of the tiny top-k models that ``benchmarks/comm_volume.py`` trains and caches under
``benchmarks/results/comm_volume/models/``; held-out second half of the tokens, all layers;
skipped with a note when the cache is absent). Group M=1 runs on a planned placement (planned from
the first half's top-k sets, ``placement.planner.plan_layer``) and on Megatron's contiguous blocks;
MoGE's groups are the EP ranks (placement changes nothing for it: every token visits every
group). Writes ``<out>/designs_volume.json`` and ``.md`` (the table of ``docs/designs.md``).

Shape suffixes: L layers, T tokens, E experts, K top-k, P EP ranks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_c2r.comm.accounting import count_rows  # noqa: E402
from megatron_c2r.routing.functional import group_topk, groups_from_expert_to_group  # noqa: E402
from megatron_c2r.routing.moge import group_balanced_topk  # noqa: E402

SHAPES = {"8e2": (8, 2), "16e4": (16, 4), "60e4": (60, 4), "64e8": (64, 8), "256e8": (256, 8)}
MODELS = os.path.join(ROOT, "benchmarks", "results", "comm_volume", "models")
WIDTHS = (1.0, 0.5, 0.25)  # d / H


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["16e4", "64e8"], choices=sorted(SHAPES))
    p.add_argument("--ep", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--hidden", type=int, default=2048, help="H for the bytes columns")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the uniform source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "designs_volume"))
    return p.parse_args(argv)


def sources(key: str, tokens: int, seed: int) -> dict:
    """{name: (profile_LTE or None, measure_LTE)} router logits per routing source."""
    experts, _ = SHAPES[key]
    gen = torch.Generator().manual_seed(seed)
    out = {"uniform": (torch.randn(1, tokens, experts, generator=gen),) * 2}
    cached = sorted(glob.glob(os.path.join(MODELS, f"{key}_*", "logits.pt")))
    if cached:
        logits_LTE = torch.load(cached[0], weights_only=True)["logits_LTE"].float()
        half = logits_LTE.shape[1] // 2
        out["trained"] = (logits_LTE[:, :half], logits_LTE[:, half:])
    return out


def planned_order(profile_TE: torch.Tensor, topk: int, ep: int, seed: int) -> torch.Tensor:
    """The planner's relabelling (new expert i = old order[i]) from the profile's top-k sets."""
    from megatron_c2r.placement.planner import PlannerConfig, plan_layer
    from megatron_c2r.placement.sources import LayerCollab

    top_TK = profile_TE.topk(topk, dim=1).indices
    plan = plan_layer(LayerCollab.from_top_indices(top_TK.numpy(), profile_TE.shape[1]),
                      PlannerConfig(ep_size=ep, seed=seed))  # fmt: skip
    return torch.tensor(plan.order)


def routing_map(rule: str, logits_TE: torch.Tensor, topk: int, ep: int) -> torch.Tensor:
    """bool [T, E] for one rule on contiguous groups = EP ranks (relabel logits first to place)."""
    experts = logits_TE.shape[1]
    e2g_E = torch.arange(experts) // (experts // ep)
    if rule == "top-k":
        idx_TK = logits_TE.topk(topk, dim=1).indices
    elif rule == "group M=1":
        idx_TK = group_topk(logits_TE, topk, e2g_E, ep, 1, anchored=True)[1]
    else:  # MoGE
        idx_TK = group_balanced_topk(logits_TE, topk, groups_from_expert_to_group(e2g_E, ep))[1]
    return torch.zeros_like(logits_TE, dtype=torch.bool).scatter_(1, idx_TK, True)


def measure(map_TE: torch.Tensor, ep: int, topk: int, hidden: int) -> dict:
    """Counters summed over P source ranks (tokens split evenly), per token."""
    tokens, experts = map_TE.shape
    chunks = torch.arange(tokens) * ep // tokens  # source rank of each token
    rows = remote = mrows_remote = 0
    for rank in range(ep):
        c = count_rows(map_TE[chunks == rank], ep, rank)
        rows, remote, mrows_remote = rows + c["rows"], remote + c["rows_remote"], \
            mrows_remote + c["megatron_rows_remote"]
    load_P = map_TE.view(tokens, ep, experts // ep).sum(dim=(0, 2)).double()
    slots = min(topk, experts // ep)
    out = dict(ranks_per_token=rows / tokens, remote_rows_per_token=remote / tokens,
               megatron_remote_rows_per_token=mrows_remote / tokens,
               busiest_over_mean=float(load_P.max() / load_P.mean()))  # fmt: skip
    for ratio in WIDTHS:
        d = int(hidden * ratio)
        out[f"bytes_per_token_d{ratio:g}"] = remote * (2 * d + 8 * slots + 2 * d) / tokens
    out["megatron_bytes_per_token"] = mrows_remote * (2 * hidden + 4 + 2 * hidden) / tokens
    return out


def run(args) -> list:
    results = []
    for key in args.shapes:
        experts, topk = SHAPES[key]
        for name, (profile_LTE, measure_LTE) in sources(key, args.tokens, args.seed).items():
            for ep in args.ep:
                if experts % ep:
                    continue
                cases = [("top-k", "contiguous"), ("group M=1", "contiguous"),
                         ("group M=1", "planned"), ("MoGE", "contiguous")]  # fmt: skip
                for rule, placement in cases:
                    na = None
                    if rule == "MoGE" and topk % ep:
                        na = f"G={ep} does not divide k={topk}"
                    if rule == "group M=1" and topk > experts // ep:
                        na = f"k={topk} > {experts // ep} experts per rank"
                    if na:
                        results.append(dict(shape=key, source=name, ep=ep, rule=rule,
                                            placement=placement, na=na))
                        continue
                    per_layer = []
                    for profile_TE, logits_TE in zip(profile_LTE, measure_LTE):
                        if placement == "planned":
                            logits_TE = logits_TE[:, planned_order(profile_TE, topk, ep, args.seed)]
                        per_layer.append(measure(routing_map(rule, logits_TE, topk, ep), ep, topk,
                                                 args.hidden))  # fmt: skip
                    mean = {k: sum(m[k] for m in per_layer) / len(per_layer) for k in per_layer[0]}
                    results.append(dict(shape=key, source=name, ep=ep, rule=rule,
                                        placement=placement, layers=len(per_layer), **mean))  # fmt: skip
    return results


def table(results: list, hidden: int) -> list:
    head = ("| shape | routing | EP | rule | placement | ranks/token | remote rows/token "
            "(alltoall) | busiest/mean load | " + " | ".join(
                f"bytes/token d=H{'' if r == 1 else f'/{int(1 / r)}'}" for r in WIDTHS)
            + " | alltoall bytes/token |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["shape"], r["source"], str(r["ep"]), r["rule"], r["placement"]]
        if "na" in r:
            lines.append("| " + " | ".join(cells + [f"n/a: {r['na']}"] + [""] * 6) + " |")
            continue
        cells += [f"{r['ranks_per_token']:.2f}",
                  f"{r['remote_rows_per_token']:.2f} ({r['megatron_remote_rows_per_token']:.2f})",
                  f"{r['busiest_over_mean']:.2f}"]  # fmt: skip
        cells += [f"{r[f'bytes_per_token_d{x:g}'] / 1024:.1f} KiB" for x in WIDTHS]
        cells.append(f"{r['megatron_bytes_per_token'] / 1024:.1f} KiB")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"bytes: one MoE layer, dispatch + combine, remote only, bf16 hidden H={hidden}, "
                 "fp32 metadata; `python benchmarks/designs_volume.py`")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "designs_volume.json"), "w") as f:
        json.dump(dict(hidden=args.hidden, results=results), f, indent=1)
    lines = table(results, args.hidden)
    with open(os.path.join(args.out, "designs_volume.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not any(r["source"] == "trained" for r in results):
        print(f"note: no trained logits under {MODELS}: run benchmarks/comm_volume.py once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
