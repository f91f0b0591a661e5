"""The ``megatron-c2r`` command.

Subcommands register themselves through ``_SUBCOMMANDS``: each entry names a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their subcommand
runs, so ``megatron-c2r --help`` stays fast and never imports megatron.core or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from megatron_c2r import __version__

# name -> (module, one-line help)
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "megatron_c2r.cpu.cli",
        "the CPU main job: tiny real C2R MoE pretraining on gloo (no GPU needed)",
    ),
    "pretrain": (
        "megatron_c2r.pretrain",
        "run one process of Megatron-LM GPT pretraining with C2R from a YAML config",
    ),
    "render": (
        "megatron_c2r.render",
        "print the exact command line and environment a YAML config runs",
    ),
    "plan": (
        "megatron_c2r.placement.cli_plan",
        "plan a collaboration-aware expert placement (and Top-T lists) from routing statistics",
    ),
    "convert": (
        "megatron_c2r.placement.cli_convert",
        "apply a placement plan to a torch_dist checkpoint (relabel experts, offline)",
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-c2r",
        description=(
            "Collaboration-constrained MoE routing and de-duplicating expert parallelism "
            "for Megatron-core."
        ),
    )
    parser.add_argument("--version", action="version", version=f"megatron-c2r {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Our validation errors are one line that names the field, value and fix.
        print(f"megatron-c2r {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
