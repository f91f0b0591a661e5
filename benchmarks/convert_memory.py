"""Peak memory of `megatron-c2r convert` (tensor by tensor) vs loading the whole checkpoint.

    python benchmarks/convert_memory.py [--layers 8] [--hidden 256] [--experts 16] [--work DIR]

Builds a GPTModel (local spec, SequentialMLP experts) on CPU, saves its torch_dist checkpoint
with optimizer state in the layout Megatron's DistributedOptimizer writes with
--dist-ckpt-optim-fully-reshardable ("optimizer.state.{param,exp_avg,exp_avg_sq}.<key>", one
per model tensor), then converts it with a random plan twice, each in a fresh process:
    streaming   placement.checkpoint.convert_checkpoint (what `convert` runs)
    whole       the pre-streaming algorithm: load every tensor, relabel_tensors, save all
and prints each one's peak resident memory above the process's resident memory just before the
conversion (Linux VmHWM after resetting it through /proc/self/clear_refs), next to the
checkpoint's size and its largest tensor. Both outputs are checked to hold the same tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init_dist() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build(args) -> dict:
    """Save the source checkpoint and the plan; returns sizes."""
    import numpy as np
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_c2r import compat
    from megatron_c2r.placement.plan_file import Plan, PlanLayer, write_plan

    sys.path.insert(0, ROOT)
    from tests.megatron_cpu import init_parallel, megatron_cpu

    init_parallel(ep=1)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
        num_moe_experts=args.experts, moe_router_topk=2, moe_ffn_hidden_size=2 * args.hidden,
        ffn_hidden_size=4 * args.hidden, use_cpu_initialization=True, add_bias_linear=False,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        bf16=False, params_dtype=torch.float32)
    with megatron_cpu():
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=args.experts, moe_grouped_gemm=False), vocab_size=1024,
            max_sequence_length=128)
    sharded = model.sharded_state_dict()
    tensors = [v for v in sharded.values() if isinstance(v, ShardedTensor)]
    for state in ("param", "exp_avg", "exp_avg_sq"):  # the fully_reshardable optimizer layout:
        for i, t in enumerate(tensors):  # each model chunk's sharding, under another key
            sharded[f"optimizer.{state}.{i}"] = dataclasses.replace(
                t, key=f"optimizer.state.{state}.{t.key}", data=torch.randn_like(t.data))
    src = os.path.join(args.work, "src")
    os.makedirs(src)
    compat.save_dist_checkpoint(sharded, src)
    rng = np.random.default_rng(0)
    layers = []
    for i in range(args.layers):
        order = rng.permutation(args.experts).tolist()
        layers.append(PlanLayer.from_groups(i, [order[: args.experts // 2],
                                                order[args.experts // 2:]], {}))
    write_plan(Plan(num_experts=args.experts, ep_size=2, top_k=2, layers=layers),
               os.path.join(args.work, "plan.json"))
    sizes = {}
    for t in tensors:  # one entry per layer of a stacked key: add them up per key
        sizes[t.key] = sizes.get(t.key, 0) + t.data.numel() * t.data.element_size()
    return dict(checkpoint_mib=4 * sum(sizes.values()) / 2**20,
                largest_tensor_mib=max(sizes.values()) / 2**20, tensors=4 * len(sizes))


def _whole_path(src: str, plan, out: str) -> None:
    """The pre-streaming converter: every tensor in memory, relabelled, saved."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_c2r import compat
    from megatron_c2r.placement.checkpoint import relabel_tensors

    metadata = load_sharded_metadata(src)
    loaded = dist_checkpointing.load(metadata, src, validate_access_integrity=False)
    tensors = {v.key: loaded[k] for k, v in metadata.items() if isinstance(v, ShardedTensor)}
    del loaded
    relabelled = relabel_tensors(tensors, plan)
    del tensors
    os.makedirs(out)
    compat.save_dist_checkpoint({k: ShardedTensor.from_rank_offsets(k, t.contiguous(), replica_id=0)
                                 for k, t in relabelled.items()}, out)


def _child(mode: str, work: str) -> None:
    _init_dist()
    from megatron_c2r.placement.checkpoint import convert_checkpoint
    from megatron_c2r.placement.plan_file import read_plan

    plan = read_plan(os.path.join(work, "plan.json"))
    # Import what both paths use before measuring: only the conversion's data counts.
    import megatron.core.dist_checkpointing.serialization  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from megatron_c2r import compat  # noqa: F401
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    out = os.path.join(work, f"out_{mode}")
    if mode == "streaming":
        convert_checkpoint(os.path.join(work, "src"), plan, out)
    else:
        _whole_path(os.path.join(work, "src"), plan, out)
    peak = _rss_kib("VmHWM")
    print(json.dumps(dict(mode=mode, rss_before_mib=before / 1024, peak_mib=peak / 1024,
                          peak_above_before_mib=(peak - before) / 1024)))


def _same_tensors(work: str) -> bool:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
    import torch

    def whole(path):
        meta = {k: v for k, v in load_sharded_metadata(path).items()
                if isinstance(v, ShardedTensor)}
        loaded = dist_checkpointing.load(meta, path, validate_access_integrity=False)
        return {v.key: loaded[k] for k, v in meta.items()}

    a, b = whole(os.path.join(work, "out_streaming")), whole(os.path.join(work, "out_whole"))
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.work)
        return 0
    own = args.work is None
    work = args.work = args.work or tempfile.mkdtemp(prefix="c2r-convert-memory-")
    try:
        _init_dist()
        sizes = _build(args)
        results = [sizes]
        for mode in ("streaming", "whole"):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                                   "--work", work], capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results.append(dict(outputs_identical=_same_tensors(work)))
        for r in results:
            print(json.dumps(r))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
