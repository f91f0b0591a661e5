"""De-duplicating expert-parallel communication: pure torch, no Megatron imports.

- ``all_to_all``: the differentiable ``all_to_all_single`` with explicit splits (gloo and NCCL).
- ``rows``: one row per (token, destination rank), local expansion, pre-combine, combine.
- ``accounting``: per-layer row/byte counters and the uniform-routing expectation.
- ``reference``: single-process loop oracles for each step and the whole path.
"""

from megatron_c2r.comm.accounting import (
    CommStats,
    count_rows,
    expected_ranks_per_token_uniform,
    stats_from_counts,
)
from megatron_c2r.comm.all_to_all import all_to_all_single, exchange_counts, reference_all_to_all
from megatron_c2r.comm.rows import (
    ExpandedRows,
    SendRows,
    build_send_rows,
    combine_rows,
    expand_rows,
    meta_dtype,
    precombine_rows,
)

__all__ = [
    "CommStats",
    "ExpandedRows",
    "SendRows",
    "all_to_all_single",
    "build_send_rows",
    "combine_rows",
    "count_rows",
    "exchange_counts",
    "expand_rows",
    "expected_ranks_per_token_uniform",
    "meta_dtype",
    "precombine_rows",
    "reference_all_to_all",
    "stats_from_counts",
]
