"""De-duplicating expert-parallel communication: pure torch, no Megatron imports.

- ``all_to_all``: the differentiable ``all_to_all_single`` with explicit splits (gloo and NCCL).
- ``rows``: one row per (token, destination rank), local expansion, pre-combine, combine.
- ``accounting``: per-layer row/byte counters and the uniform-routing expectation.
- ``reference``: single-process loop oracles for each step and the whole path.

Shape-suffix legend for the whole package (one meaning per letter; a tensor named ``x_QH`` is
``[Q, H]``). Add a letter here before using it in any module of ``comm/``:
    T   tokens on this rank (sequence x batch, flattened)
    H   hidden size
    E   experts (global)
    P   ranks in the EP group
    L   local experts per rank (E/P)
    S   metadata slots per row, min(topk, L)
    M   metadata columns per row (2S: S probs, then S local expert ids, -1 = empty slot)
    R   rows this rank sends: one per (token, destination rank), grouped by destination rank
    Q   rows this rank receives, grouped by source rank
    N   expert input rows: one per (received row, local expert), grouped by local expert
    C   columns of the count table exchanged before the rows
    K   top-k (selected experts per token)
  the two-level (node, then rank) path (``two_level.py``, ``topology.py``):
    D   nodes the EP group spans                G   EP ranks per node (P = D * G)
    J   experts per node (G * L)                V   node-row slots, min(topk, J)
    A   node-row metadata columns (2V)          W   rank-row metadata columns (2S + 1)
    B   node rows (one per (token, destination node)); R and Q there are the rank rows a relay
        sends and a rank receives
"""

from megatron_c2r.comm.accounting import (
    CommStats,
    count_rows,
    expected_ranks_per_token_uniform,
    stats_from_counts,
)
from megatron_c2r.comm.all_to_all import (
    all_to_all_pair,
    all_to_all_single,
    exchange_counts,
    reference_all_to_all,
)
from megatron_c2r.comm.rows import (
    ExpandedRows,
    SendCounts,
    SendRows,
    build_send_rows,
    combine_rows,
    count_send_rows,
    expand_rows,
    meta_dtype,
    precombine_rows,
)

__all__ = [
    "CommStats",
    "ExpandedRows",
    "SendCounts",
    "SendRows",
    "all_to_all_pair",
    "all_to_all_single",
    "build_send_rows",
    "combine_rows",
    "count_rows",
    "count_send_rows",
    "exchange_counts",
    "expand_rows",
    "expected_ranks_per_token_uniform",
    "meta_dtype",
    "precombine_rows",
    "reference_all_to_all",
    "stats_from_counts",
]
