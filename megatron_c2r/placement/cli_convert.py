"""`megatron-c2r convert`: apply a placement plan to a torch_dist checkpoint, offline, on CPU.

    megatron-c2r convert --load ckpts/run1 --plan plan.json --save ckpts/run1-placed

Top-level imports stay light (argparse only): the CLI builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="torch_dist checkpoint directory, or a Megatron-LM --save directory "
                             "(latest_checkpointed_iteration.txt)")
    parser.add_argument("--plan", required=True, metavar="PLAN", help="plan.json from `plan`")
    parser.add_argument("--save", required=True, metavar="OUT",
                        help="new directory for the relabelled checkpoint (same layout)")
    parser.add_argument("--drop-optimizer", action="store_true",
                        help="leave optimizer state out (needed for flat DistributedOptimizer "
                             "buffers, which mix experts)")


def _init_single_process_group() -> bool:
    """dist_checkpointing needs a process group; one gloo process on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def run(args: argparse.Namespace) -> int:
    from megatron_c2r.placement.checkpoint import convert_checkpoint, resolve_checkpoint
    from megatron_c2r.placement.plan_file import read_plan

    plan = read_plan(args.plan)
    resolve_checkpoint(args.load)  # fail fast on a wrong path before importing megatron
    import torch.distributed as dist

    created = _init_single_process_group()
    try:
        out = convert_checkpoint(args.load, plan, args.save, drop_optimizer=args.drop_optimizer)
    finally:
        if created:
            dist.destroy_process_group()
    moved = sum(o != i for layer in plan.layers for i, o in enumerate(layer.order))
    print(f"wrote {out}: {len(plan.layers)} MoE layers relabelled "
          f"({moved} of {len(plan.layers) * plan.num_experts} expert slots changed)",
          file=sys.stderr)
    return 0
