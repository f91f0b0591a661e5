"""``python -m megatron_c2r.pretrain CONFIG.yaml [--set k=v ...] [--dry-run]``: ``megatron-c2r
pretrain`` as a module, for launchers that start ``-m MODULE`` (one process per GPU)::

    torchrun --nproc-per-node 8 -m megatron_c2r.pretrain configs/mixtral_8x7b_c2r.yaml
    srun --ntasks-per-node 8 ... python -m megatron_c2r.pretrain configs/olmoe_1b_7b_c2r.yaml

It loads and validates the config (errors before anything starts), checks for a Megatron-LM
checkout and CUDA, exports the config's ``env:``, then runs ``megatron_c2r.megatron_lm`` in this
process with the argv ``megatron-c2r render`` prints. The arguments and errors are the ``pretrain``
subcommand's (``megatron_c2r.cli``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_c2r.cli import main as cli_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-c2r pretrain <argv>`` (default ``sys.argv[1:]``); returns the exit status."""
    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
