"""C2RRouter (each mode) vs Megatron's TopKRouter: forward+backward time, measured side by side.

    python benchmarks/router_overhead.py                       # E=64, k=8, 16k tokens, hidden 1024
    python benchmarks/router_overhead.py --tokens 4096 --reps 9

Runs in one process on CPU (a one-rank gloo group, as Megatron's aux-loss path needs one).
Repetitions are interleaved (stock, c2r, group, ..., stock, c2r, ...) so machine noise hits every
variant alike; the script prints the median of per-repetition ratios to the stock router.
Absolute times are noise on shared machines; the ratios are the result. Variants: Megatron's
plain and node-limited (group-limited, groups = nodes) TopKRouter; ours in every mode, the group
rule without its tracker (the cost of counting plain top-k's preference under the constraint),
the node rules (anchored M=1/M=2, Megatron's node score) and the node rule with the group bias or
DeepSeek-V2's device/communication balance losses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=8, help="EP size the groups stand for")
    ap.add_argument("--nodes", type=int, default=4, help="nodes the groups sit on (node variants)")
    ap.add_argument("--top-t", type=int, default=16)
    ap.add_argument("--aux-loss-coeff", type=float, default=1e-2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_c2r.compat import get_default_pg_collection
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.routing.config import C2RRouterConfig
    from tests.dist_pool import _free_port
    from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    init_parallel(ep=1)
    config = moe_config(
        num_moe_experts=args.experts, moe_router_topk=args.topk, hidden_size=args.hidden,
        moe_aux_loss_coeff=args.aux_loss_coeff,
    )
    torch.manual_seed(0)
    with megatron_cpu():
        from megatron.core.transformer.moe.router import TopKRouter

        stock = TopKRouter(config, pg_collection=get_default_pg_collection())
        # Megatron's node-limited routing (group-limited, groups = nodes): the stock baseline of
        # the node rules; same weights as the plain stock router.
        node_config = moe_config(
            num_moe_experts=args.experts, moe_router_topk=args.topk, hidden_size=args.hidden,
            moe_aux_loss_coeff=args.aux_loss_coeff, moe_router_num_groups=args.nodes,
            moe_router_group_topk=1,
        )
        stock_node = TopKRouter(node_config, pg_collection=get_default_pg_collection())
        stock_node.load_state_dict(stock.state_dict())
    variants = {"TopKRouter (stock)": stock, f"TopKRouter node-limited 1 of {args.nodes}": stock_node}
    groups, nodes = dict(num_groups=args.groups), dict(mode="node", num_groups=args.groups, num_nodes=args.nodes)
    modes = {
        "C2RRouter topk": C2RRouterConfig(mode="topk"),
        f"C2RRouter c2r T={args.top_t}": C2RRouterConfig(mode="c2r", top_t=args.top_t),
        "C2RRouter group M=1 anchored": C2RRouterConfig(mode="group", **groups),
        "C2RRouter group M=1, no tracker": C2RRouterConfig(mode="group", track_collaboration=False, **groups),
        "C2RRouter group M=2 anchored": C2RRouterConfig(mode="group", max_groups=2, **groups),
        "C2RRouter group M=1 + penalty": C2RRouterConfig(mode="group", penalty_coeff=1e-3, **groups),
        "C2RRouter node M=1 anchored": C2RRouterConfig(max_nodes=1, **nodes),
        "C2RRouter node M=2 anchored": C2RRouterConfig(max_nodes=2, **nodes),
        "C2RRouter node M=1 score (Megatron's)": C2RRouterConfig(max_nodes=1, group_selection="group_score", **nodes),
        "C2RRouter node M=1 + group bias": C2RRouterConfig(max_nodes=1, group_bias_rate=1e-3, **nodes),
        "C2RRouter node M=1 + balance losses": C2RRouterConfig(
            max_nodes=1, device_balance_coeff=0.05, comm_balance_coeff=0.02, **nodes),
    }
    gen = torch.Generator().manual_seed(1)
    lists = torch.stack([
        torch.tensor([j for j in torch.randperm(args.experts, generator=gen).tolist() if j != e][: args.top_t])
        for e in range(args.experts)
    ])
    for name, cfg in modes.items():
        router = C2RRouter(config, c2r_config=cfg)
        router.load_state_dict(stock.state_dict(), strict=False)
        if cfg.mode == "c2r":
            router.set_top_t_lists(lists)
        variants[name] = router
    for r in variants.values():
        r.set_layer_number(1)
        r.train()

    x = torch.randn(args.tokens // 2, 2, args.hidden)
    grad_w = torch.randn(args.tokens, args.experts)

    def run_once(router):
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        ctx = megatron_cpu() if router in (stock, stock_node) else _Null()
        with ctx:
            probs, _ = router(xi)
            (probs * grad_w).sum().backward()
        return time.perf_counter() - t0

    for r in variants.values():  # warm-up (torch.compile'd helpers, allocator)
        run_once(r)
    times = {name: [] for name in variants}
    for _ in tqdm(range(args.reps), desc="interleaved reps", leave=False):
        for name, r in variants.items():
            times[name].append(run_once(r))
    base = times["TopKRouter (stock)"]
    print(f"\nrouter forward+backward, E={args.experts} k={args.topk} tokens={args.tokens} "
          f"hidden={args.hidden} aux_loss={args.aux_loss_coeff}, {args.reps} interleaved reps, "
          f"{args.threads} thread(s)")
    print(f"{'variant':40s} {'median ratio vs stock':>22s}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:40s} {ratio:22.3f}")
    return 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
