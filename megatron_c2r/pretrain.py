"""``megatron-c2r pretrain CONFIG.yaml [--set k=v ...]`` / ``python -m megatron_c2r.pretrain``.

Runs ONE process of Megatron-LM GPT pretraining with C2R from a YAML file: loads and validates the
config (errors before anything starts), checks for a Megatron-LM checkout and CUDA, exports the
config's ``env:``, then runs ``megatron_c2r.megatron_lm`` in this process with the argv that
``megatron-c2r render`` prints. Start one per GPU, as for ``pretrain_gpt.py``::

    torchrun --nproc-per-node 8 -m megatron_c2r.pretrain configs/mixtral_8x7b_c2r.yaml
    srun --ntasks-per-node 8 ... python -m megatron_c2r.pretrain configs/olmoe_1b_7b_c2r.yaml

``--dry-run`` prints the rendered shell form instead of running.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def add_arguments(parser) -> None:
    parser.add_argument("config", help="run config YAML (see megatron_c2r/config.py)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a value, e.g. --set megatron.train-iters=100",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run")


def run(args) -> int:
    from megatron_c2r.config import load_config
    from megatron_c2r.megatron_lm import entry as train
    from megatron_c2r.render import render

    cfg = load_config(args.config, args.overrides)
    cfg.check_megatron_lm()
    if args.dry_run:
        sys.stdout.write(render(cfg, "shell"))
        return 0
    try:
        train.ensure_requirements(cfg.launch.megatron_lm)
    except train.MissingRequirement as exc:
        print(f"megatron-c2r pretrain: error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(cfg.environment())
    return train.main(cfg.megatron_argv() + cfg.c2r_argv())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_c2r.pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megatron-c2r pretrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
