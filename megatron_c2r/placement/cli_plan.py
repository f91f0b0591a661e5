"""`megatron-c2r plan`: collaboration data -> placement plan file (+ a per-layer quality table).

    megatron-c2r plan --collab traces/ --ep 8 --top-t 30 --out plan.json

Top-level imports stay light (argparse only): the CLI builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collab", required=True, metavar="PATH",
                        help="collaboration source: .npy/.pt matrix [L,E,E] or [E,E], tracker "
                             "state dict (.pt), routing dump (.pt), Megatron routing-trace "
                             ".jsonl or its directory")
    parser.add_argument("--ep", type=int, required=True, metavar="P",
                        help="expert-parallel size: experts are split into P groups of E/P")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="experts per token (required for matrices; checked for traces)")
    parser.add_argument("--top-t", type=int, default=None, metavar="T",
                        help="also write Top-T collaborator lists (the C2R paper's rule)")
    parser.add_argument("--num-experts", type=int, default=None, metavar="E",
                        help="number of experts (traces: default max id + 1)")
    parser.add_argument("--seed", type=int, default=0, help="planner seed (deterministic)")
    parser.add_argument("--restarts", type=int, default=4,
                        help="heuristic starts per layer (greedy, identity, random...)")
    parser.add_argument("--out", default="plan.json", help="plan file to write (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_table(plans, exact: bool) -> str:
    """Per-layer predicted ranks/token: identity, random, planned, and the planned gain."""
    lines = [f"{'layer':>5}  {'identity':>8}  {'random':>8}  {'planned':>8}  "
             f"{'vs identity':>11}  {'vs random':>9}"]
    sums = [0.0, 0.0, 0.0]
    for i, p in enumerate(plans):
        r = p.predicted_ranks_per_token
        vals = [r["identity"], r["random"], r["planned"]]
        sums = [s + v for s, v in zip(sums, vals)]
        lines.append(_row(str(i), vals))
    if len(plans) > 1:
        lines.append(_row("mean", [s / len(plans) for s in sums]))
    how = "exact, from full top-k sets" if exact else "estimated from pair counts"
    lines.append(f"(predicted distinct EP ranks per token, {how})")
    return "\n".join(lines)


def _row(label: str, vals) -> str:
    ident, rand, planned = vals
    return (f"{label:>5}  {ident:8.3f}  {rand:8.3f}  {planned:8.3f}  "
            f"{100 * (planned / ident - 1):+10.1f}%  {100 * (planned / rand - 1):+8.1f}%")


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_c2r.collaboration import top_t_lists
    from megatron_c2r.placement.plan_file import Plan, PlanLayer, write_plan
    from megatron_c2r.placement.planner import PlannerConfig, plan_layers
    from megatron_c2r.placement.sources import load_collaboration

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out directory {out_dir!r} does not exist")
    if args.ep < 1:
        raise ValueError(f"--ep {args.ep} must be >= 1")
    layers = load_collaboration(args.collab, top_k=args.top_k, num_experts=args.num_experts)
    num_experts, top_k = layers[0].num_experts, layers[0].top_k
    if any(layer.num_experts != num_experts or layer.top_k != top_k for layer in layers):
        raise ValueError(f"{args.collab}: layers differ in num_experts or top_k; plan them "
                         "separately")
    if num_experts % args.ep:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by --ep ({args.ep}): "
                         "pick P from the divisors of E")
    if args.top_t is not None and not 0 <= args.top_t <= num_experts - 1:
        raise ValueError(f"--top-t {args.top_t} must be in [0, num_experts-1={num_experts - 1}]")

    config = PlannerConfig(ep_size=args.ep, seed=args.seed, restarts=args.restarts)
    plans = plan_layers(layers, config, progress=not args.no_progress)
    plan_layers_out = []
    for i, (layer, p) in enumerate(zip(layers, plans)):
        lists = None
        if args.top_t is not None:
            lists = top_t_lists(torch.from_numpy(layer.counts_EE), args.top_t).tolist()
        plan_layers_out.append(
            PlanLayer(i, p.groups, p.expert_to_rank, p.predicted_ranks_per_token, lists)
        )
    plan = Plan(num_experts=num_experts, ep_size=args.ep, top_k=top_k, layers=plan_layers_out)
    print(format_table(plans, exact=all(p.exact for p in plans)))
    write_plan(plan, args.out)
    print(f"wrote {args.out} ({len(plans)} layers, E={num_experts}, EP={args.ep}, k={top_k})",
          file=sys.stderr)
    return 0
