"""MoE layer forward+backward time: our dedup dispatchers (flat and two-level) vs Megatron's
alltoall, same routing.

    python benchmarks/layer_time.py                          # EP=2 and EP=4 gloo processes, CPU
    python benchmarks/layer_time.py --ep 4 --gpus-per-node 2 # + two-level at 2 nodes x 2 ranks
    python benchmarks/layer_time.py --ep 4 --reps 21 --hidden 2048 --ffn 512
    python benchmarks/layer_time.py --device cuda            # one GPU, EP=1: the local path
    python benchmarks/layer_time.py --json benchmarks/results/layer_time.json

What is timed: one MoE layer (Megatron's MoELayer stages: dispatch preprocess -> all-to-all ->
SequentialMLP experts -> combine) forward + backward on every rank, from identical weights and
one routing map per rank shared by every dispatcher; the router is bypassed so all see exactly
the same routing (``topk``: uniform random top-k; ``group``: group-limited with M=1, i.e. one
rank's expert block per token, then top-k inside it). Repetitions rotate the order of the layers
(ABC, BCA, CAB, ...), each timed between barriers as the slowest rank's time; we report the
median of the per-repetition ratios, and the rows each ships per token.

Two-level (``--gpus-per-node G``, default 2): at every EP size with more than one node of G
ranks (EP=4: 2 nodes x 2) the layer also runs with ``TwoLevelDedupTokenDispatcher`` (nodes
simulated: node = rank // G), and the table adds its time, its ratios to Megatron and to the
flat dedup, and the inter-node rows per token of all three (from their counters / the routing).

What CPU can and cannot show. All "nodes" are processes on one machine: an inter-node row costs
the same loopback copy as an intra-node one, there is no NIC to relieve, and the ranks share the
cores. So the two-level dispatcher's point (fewer rows on the slow inter-node links: DGX H100 ~8x
slower than NVLink) is invisible here; what the CPU measures is its overhead at equal link
speeds: one more pair of all-to-alls per direction, the relay's row building and one more
pre-combine. That is an upper bound of what the extra hop costs where links are equal; the rows
columns are what it saves where they are not. GPU timings need a multi-node run.

On CPU the stock alltoall dispatcher needs the test-only patches in ``tests/megatron_cpu.py``
(CUDA streams); our dispatchers need none. With ``--device cuda`` there is one GPU, so EP=1 and
no all-to-all: it measures the local permutation path only. Results under benchmarks/results/
are not committed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes (CPU: processes)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size H (>= 1024)")
    p.add_argument("--ffn", type=int, default=256, help="expert FFN size (fine-grained experts)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank (seq len, batch 1)")
    p.add_argument("--routing", nargs="+", default=["topk", "group"], choices=["topk", "group"])
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per layer")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU process")
    p.add_argument("--gpus-per-node", type=int, default=2,
                   help="simulated node size G: EP sizes with EP > G and EP %% G == 0 also time "
                        "the two-level dispatcher (0: never)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.hidden < 1024:
        p.error(f"--hidden {args.hidden}: the benchmark is specified for hidden >= 1024")
    if args.device == "cuda":
        args.ep = [1]
    for ep in args.ep:
        if args.experts % ep or args.topk > args.experts // ep and "group" in args.routing:
            p.error(
                f"--experts {args.experts} must be divisible by --ep {ep}, and group routing "
                f"needs --topk {args.topk} <= experts per rank {args.experts // ep}"
            )
    return args


def make_routing(mode, T, E, k, P, seed, device):
    """``routing_map`` [T, E] bool and dense ``probs`` [T, E] fp32 (softmax of random scores)."""
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(T, E, generator=g)
    if mode == "topk":
        chosen_TK = scores_TE.topk(k, dim=1).indices
    else:  # group M=1: pick one rank's block for each token, then top-k inside it
        L = E // P
        block_T1 = torch.randint(0, P, (T, 1), generator=g)
        inside_TK = scores_TE.view(T, P, L)[torch.arange(T), block_T1[:, 0]].topk(k, dim=1)
        chosen_TK = inside_TK.indices + block_T1 * L
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, chosen_TK, True)
    probs_TE = torch.where(routing_map_TE, scores_TE.softmax(dim=1), 0.0)
    return routing_map_TE.to(device), probs_TE.to(device)


def two_level_nodes(args, ep: int) -> int:
    """Nodes the two-level dispatcher is timed at for this EP size (0: not timed)."""
    G = args.gpus_per_node
    return ep // G if G > 0 and ep > G and ep % G == 0 else 0


def build_layers(args, ep):
    """{name: MoE layer} with identical weights on this rank: ``dedup`` (ours, flat),
    ``megatron`` (stock alltoall) and, when :func:`two_level_nodes` says so, ``two_level`` (ours
    with the two-level dispatcher installed; nodes of ``--gpus-per-node`` consecutive ranks)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r.moe.layer import C2RMoELayer
    from tests.megatron_cpu import moe_config

    dtype = getattr(torch, args.dtype)
    config = moe_config(
        hidden_size=args.hidden,
        num_attention_heads=8,
        ffn_hidden_size=4 * args.hidden,
        moe_ffn_hidden_size=args.ffn,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_router_pre_softmax=args.topk == 1,
        bf16=dtype is torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=True,
    )
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts)
    torch.manual_seed(0)
    ours = C2RMoELayer(config, spec.submodules, dispatcher="dedup")
    theirs = MoELayer(config, spec.submodules)
    theirs.load_state_dict(ours.state_dict())
    layers = {"dedup": ours, "megatron": theirs}
    if two_level_nodes(args, ep):
        from megatron_c2r.moe.two_level_dispatcher import TwoLevelDedupTokenDispatcher

        two = C2RMoELayer(config, spec.submodules, dispatcher="dedup")
        two.load_state_dict(ours.state_dict())
        two.token_dispatcher = TwoLevelDedupTokenDispatcher(
            two.num_local_experts, two.local_expert_indices, config=two.config,
            gpus_per_node=args.gpus_per_node,
        )  # fmt: skip
        layers["two_level"] = two
    return {name: layer.to(args.device) for name, layer in layers.items()}


def step(layer, x, grad_out, routing_map, probs):
    """One forward+backward through the layer's own stage methods, router bypassed."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    probs = probs.detach().requires_grad_()
    h, p = layer.preprocess(x, probs, routing_map)
    h, p = layer.dispatch(h, p)
    y, _ = layer.routed_experts_compute(h, p)
    out = layer.postprocess(layer.combine(y), None)
    out.backward(grad_out)


def timed(fn, device):
    """Seconds of the slowest rank for ``fn()``, between barriers."""
    if dist.get_world_size() > 1:
        dist.barrier()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def run_rank(rank, world, port, args, queue):
    import contextlib
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    from tests.megatron_cpu import megatron_cpu

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    # Stock alltoall on CPU needs the scoped patches (CUDA streams); on a GPU it needs nothing.
    patches = megatron_cpu() if args.device == "cpu" else contextlib.nullcontext()
    results = []
    with patches:
        layers = build_layers(args, world)
        ours = layers["dedup"]
        dtype = getattr(torch, args.dtype)
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(args.tokens, 1, args.hidden, generator=g).to(args.device, dtype)
        grad_out = torch.randn(args.tokens, 1, args.hidden, generator=g).to(args.device, dtype)
        names = list(layers)
        for mode in args.routing:
            routing = make_routing(
                mode, args.tokens, args.experts, args.topk, world, rank, args.device
            )
            for _ in range(args.warmup):
                for layer in layers.values():
                    step(layer, x, grad_out, *routing)
            for layer in (layers["dedup"], layers.get("two_level")):
                if layer is not None:
                    layer.comm_stats.reset()
            times = {name: [] for name in names}
            for rep in range(args.reps):
                # rotate the order (ABC, BCA, CAB, ...) so no layer always runs first
                for name in names[rep % len(names):] + names[: rep % len(names)]:
                    times[name].append(
                        timed(lambda: step(layers[name], x, grad_out, *routing), args.device)
                    )
            s = ours.comm_stats
            two = layers["two_level"].token_dispatcher.comm_stats if "two_level" in layers else None
            totals = torch.tensor(
                [s.rows_dispatched, s.routed_tokens, s.megatron_rows_dispatched,
                 s.bytes_dispatched_remote + s.bytes_combined_remote,
                 s.megatron_bytes_dispatched_remote + s.megatron_bytes_combined_remote,
                 *((two.inter_node_rows_sent, two.flat_inter_node_rows,
                    two.megatron_inter_node_rows, two.routed_tokens) if two else (0, 0, 0, 0))],
                dtype=torch.float64,
            )  # fmt: skip
            if world > 1:
                dist.all_reduce(totals)

            def ratio(a, b):
                return statistics.median(x / y for x, y in zip(times[a], times[b]))

            result = dict(
                ep=world,
                routing=mode,
                ms_dedup=1e3 * statistics.median(times["dedup"]),
                ms_megatron=1e3 * statistics.median(times["megatron"]),
                ratio=ratio("dedup", "megatron"),
                rows_per_token_dedup=float(totals[0] / totals[1]),
                rows_per_token_megatron=float(totals[2] / totals[1]),
                remote_mb_dedup=float(totals[3]) / 2**20 / max(s.calls, 1),
                remote_mb_megatron=float(totals[4]) / 2**20 / max(s.calls, 1),
            )
            if two is not None:
                routed = float(totals[8])
                result.update(
                    nodes=two_level_nodes(args, world),
                    gpus_per_node=args.gpus_per_node,
                    ms_two_level=1e3 * statistics.median(times["two_level"]),
                    ratio_two_level_megatron=ratio("two_level", "megatron"),
                    ratio_two_level_dedup=ratio("two_level", "dedup"),
                    inter_node_rows_per_token_two_level=float(totals[5]) / routed,
                    inter_node_rows_per_token_dedup=float(totals[6]) / routed,
                    inter_node_rows_per_token_megatron=float(totals[7]) / routed,
                )
            results.append(result)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    all_results = []
    for ep in args.ep:
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=run_rank, args=(r, ep, port, args, queue)) for r in range(ep)]
        for proc in procs:
            proc.start()
        results = queue.get()
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"a rank of the EP={ep} run exited with {proc.exitcode}")
        all_results += results
    print(
        f"H={args.hidden} ffn={args.ffn} E={args.experts} k={args.topk} tokens/rank={args.tokens} "
        f"{args.dtype} {args.device} reps={args.reps} (median of per-rep ratios)"
    )
    print(
        f"{'EP':>3} {'routing':>8} {'ours ms':>9} {'megatron ms':>12} {'ratio':>7} "
        f"{'rows/token ours':>16} {'megatron':>9} {'remote MB ours':>15} {'megatron':>9}"
    )
    for r in all_results:
        print(
            f"{r['ep']:>3} {r['routing']:>8} {r['ms_dedup']:>9.1f} {r['ms_megatron']:>12.1f} "
            f"{r['ratio']:>7.3f} {r['rows_per_token_dedup']:>16.2f} "
            f"{r['rows_per_token_megatron']:>9.2f} {r['remote_mb_dedup']:>15.2f} "
            f"{r['remote_mb_megatron']:>9.2f}"
        )
    two = [r for r in all_results if "ms_two_level" in r]
    if two:
        print(
            "\ntwo-level (simulated nodes; on CPU every link costs the same, so this is the extra "
            "hop's overhead, not its inter-node saving):"
        )
        print(
            f"{'EP':>3} {'N x G':>6} {'routing':>8} {'flat ms':>8} {'two-lvl ms':>10} "
            f"{'megatron ms':>11} {'2lvl/meg':>8} {'flat/meg':>8} {'2lvl/flat':>9} "
            f"{'inter-node rows/token: 2lvl':>28} {'flat':>5} {'megatron':>8}"
        )
        for r in two:
            print(
                f"{r['ep']:>3} {str(r['nodes']) + 'x' + str(r['gpus_per_node']):>6} "
                f"{r['routing']:>8} {r['ms_dedup']:>8.1f} {r['ms_two_level']:>10.1f} "
                f"{r['ms_megatron']:>11.1f} {r['ratio_two_level_megatron']:>8.3f} "
                f"{r['ratio']:>8.3f} {r['ratio_two_level_dedup']:>9.3f} "
                f"{r['inter_node_rows_per_token_two_level']:>28.2f} "
                f"{r['inter_node_rows_per_token_dedup']:>5.2f} "
                f"{r['inter_node_rows_per_token_megatron']:>8.2f}"
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=all_results), f, indent=2)
    return all_results


if __name__ == "__main__":
    main()
