"""``python -m megatron_c2r.launch_helpers CONFIG.yaml [--set k=v ...]``: one render for a launcher.

The launch scripts (``launch/slurm/*.sbatch``, ``launch/local.sh``) need three things from a run
config: the launch knobs, the environment and the per-process command. ``megatron-c2r render``
prints each in its own format; calling it three times costs three Python + torch start-ups on a
batch host, so this module loads the config ONCE and prints all of them as bash assignments the
script ``eval``s::

    CFG_NNODES=8                     # every ``render --format launch`` key, prefixed CFG_ so
    CFG_GPUS_PER_NODE=8              # the config's WORLD_SIZE never clobbers torch's WORLD_SIZE
    ...
    C2R_ENV=(CUDA_DEVICE_MAX_CONNECTIONS=1 MEGATRON_LM_PATH=/opt/Megatron-LM ...)
    C2R_CMD=(python -m megatron_c2r.megatron_lm --num-layers 32 ...)

Values come from ``megatron_c2r.render`` and ``RunConfig`` (no YAML is parsed here or in bash), are
``shlex.quote``d, so ``eval`` reads them back exactly. Exit status 2 and one line on stderr for a
bad config (same message as ``megatron-c2r render``); any other failure (no PyYAML, no torch on
this host) exits 1, which the SLURM scripts take as "render inside the container instead".
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

PREFIX = "CFG_"


def bash_assignments(cfg) -> str:
    """``CFG_<KEY>=value`` lines, then the ``C2R_ENV`` and ``C2R_CMD`` bash arrays."""
    from megatron_c2r.render import launch_vars

    bad = [a for a in cfg.program_argv() if "\n" in a]
    if bad:  # bash would read it back fine, but a multi-line flag is never what a user meant
        raise ValueError(f"{cfg.source}: argument {bad[0]!r} contains a newline")
    lines = [f"{PREFIX}{k}={shlex.quote(v)}" for k, v in launch_vars(cfg).items()]
    env = [f"{k}={v}" for k, v in cfg.environment().items()]
    lines.append("C2R_ENV=(" + " ".join(shlex.quote(e) for e in env) + ")")
    lines.append("C2R_CMD=(" + " ".join(shlex.quote(a) for a in cfg.program_argv()) + ")")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_c2r.launch_helpers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="run config YAML (see megatron_c2r/config.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from megatron_c2r.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        cfg.check_megatron_lm()
        text = bash_assignments(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megatron-c2r render: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
