"""``megatron-c2r train``: the CPU main job (tiny real C2R pretraining on gloo)."""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"run YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a YAML value, e.g. --set c2r.max_groups=2 (repeatable)")
    parser.add_argument("--steps", type=int, help="training iterations (overrides --train-iters)")
    parser.add_argument("--out", help="output directory (overrides cpu.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--exit-after", type=int, metavar="N",
                        help="stop after iteration N (schedule unchanged), checkpoint, exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_c2r.cpu.job_config import load_cpu_config
    from megatron_c2r.cpu.trainer import run as train

    cfg = load_cpu_config(
        args.config, args.sets, train_iters=args.steps, out_dir=args.out,
        progress=False if args.no_progress else None,
    )
    train(cfg, resume=args.resume, exit_after=args.exit_after)
    return 0
