"""Row and byte accounting for the de-duplicating EP communicator.

One :class:`CommStats` per MoE layer, owned by its dispatcher, accumulated over forward passes
(``record``), read by the metrics owner, then ``reset()``. Counts are what *this* rank ships in the
forward pass; the backward pass ships the same rows in the opposite direction, so it is not
counted twice. "Remote" excludes rows a rank addresses to itself (those never leave the device).

For comparison every record also counts what Megatron's alltoall dispatcher would ship for the
same routing: one row per (token, expert) plus one prob per row.

Shape suffixes: see the legend in ``megatron_c2r/comm/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Sequence, Union

import torch


class Ratio:
    """A derived counter ratio, declared once on a stats class: the sum of the ``numerator``
    counters over the sum of the ``denominator`` counters, the denominator floored at 1 (so 0.0
    while nothing was recorded). Read-only; reads like a property (a float per instance)."""

    def __init__(self, numerator: Union[str, tuple], over: Union[str, tuple]) -> None:
        self.numerator = (numerator,) if isinstance(numerator, str) else tuple(numerator)
        self.denominator = (over,) if isinstance(over, str) else tuple(over)
        self.__doc__ = f"({' + '.join(self.numerator)}) / max({' + '.join(self.denominator)}, 1)"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, stats, owner=None):
        if stats is None:
            return self
        num = sum(getattr(stats, field) for field in self.numerator)
        return num / max(sum(getattr(stats, field) for field in self.denominator), 1)

    def __set__(self, stats, value) -> None:
        raise AttributeError(f"{self.name} is derived from the counters; set those instead")


@dataclass
class CommStats:
    """Counters for one MoE layer on one rank (plain ints; ``+=`` friendly)."""

    # Derived ratios (:class:`Ratio` attributes, below) that :meth:`as_dict` adds to the
    # counters; subclasses extend it.
    RATIOS: ClassVar[tuple[str, ...]] = (
        "ranks_per_token", "dispatch_row_reduction", "remote_byte_reduction"
    )
    calls: int = 0  # forward passes recorded
    tokens: int = 0  # local tokens entering the dispatcher
    routed_tokens: int = 0  # tokens with at least one expert
    rows_dispatched: int = 0  # one per (token, destination rank), self included
    rows_dispatched_remote: int = 0
    rows_combined: int = 0  # rows this rank sends back in combine (one per row it received)
    rows_combined_remote: int = 0
    bytes_dispatched_remote: int = 0  # hidden + metadata
    bytes_combined_remote: int = 0
    megatron_rows_dispatched: int = 0  # one per (token, expert)
    megatron_rows_dispatched_remote: int = 0
    megatron_bytes_dispatched_remote: int = 0  # hidden + one prob per row
    megatron_bytes_combined_remote: int = 0

    def record(self, other: "CommStats") -> None:
        """Add another record's counters to these (in place)."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def reset(self) -> None:
        """Zero every counter (in place)."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)

    ranks_per_token = Ratio("rows_dispatched", over="routed_tokens")
    """Distinct destination ranks per routed token (= dispatched rows per token)."""
    dispatch_row_reduction = Ratio("megatron_rows_dispatched", over="rows_dispatched")
    """Megatron's dispatched rows / ours (>= 1; k / ranks_per_token)."""
    remote_byte_reduction = Ratio(
        ("megatron_bytes_dispatched_remote", "megatron_bytes_combined_remote"),
        over=("bytes_dispatched_remote", "bytes_combined_remote"),
    )
    """Megatron's remote bytes (both directions) / ours."""

    def as_dict(self) -> dict:
        """Counters, then the :attr:`RATIOS`, for loggers."""
        out = dataclasses.asdict(self)
        out.update((name, getattr(self, name)) for name in self.RATIOS)
        return out


def stats_from_counts(
    send_counts_PC: Sequence[Sequence[int]],
    recv_counts_PC: Sequence[Sequence[int]],
    *,
    rank: int,
    tokens: int,
    routed_tokens: int,
    hidden_bytes_per_row: int,
    meta_bytes_per_row: int,
    prob_bytes: int,
) -> CommStats:
    """One forward pass's :class:`CommStats` from the count tables the dispatcher already holds on
    the host (no extra device sync).

    Args:
        send_counts_PC: P rows of ``[rows for rank p, tokens for rank p's expert 0..L-1]``.
        recv_counts_PC: the same table as received from every source rank.
        rank: this rank's index in the EP group.
        tokens, routed_tokens: local token counts.
        hidden_bytes_per_row: H * element size of the hidden states.
        meta_bytes_per_row: 2S * element size of the metadata (ours only).
        prob_bytes: element size of one prob (Megatron ships one per row in a second all-to-all).
    """
    rows = sum(r[0] for r in send_counts_PC)
    rows_remote = rows - send_counts_PC[rank][0]
    rows_back = sum(r[0] for r in recv_counts_PC)
    rows_back_remote = rows_back - recv_counts_PC[rank][0]
    mrows = sum(sum(r[1:]) for r in send_counts_PC)
    mrows_remote = mrows - sum(send_counts_PC[rank][1:])
    mrows_back_remote = sum(sum(r[1:]) for r in recv_counts_PC) - sum(recv_counts_PC[rank][1:])
    return CommStats(
        calls=1,
        tokens=tokens,
        routed_tokens=routed_tokens,
        rows_dispatched=rows,
        rows_dispatched_remote=rows_remote,
        rows_combined=rows_back,
        rows_combined_remote=rows_back_remote,
        bytes_dispatched_remote=rows_remote * (hidden_bytes_per_row + meta_bytes_per_row),
        bytes_combined_remote=rows_back_remote * hidden_bytes_per_row,
        megatron_rows_dispatched=mrows,
        megatron_rows_dispatched_remote=mrows_remote,
        megatron_bytes_dispatched_remote=mrows_remote * (hidden_bytes_per_row + prob_bytes),
        megatron_bytes_combined_remote=mrows_back_remote * hidden_bytes_per_row,
    )


def count_rows(routing_map_TE: torch.Tensor, ep_size: int, rank: int) -> dict:
    """Rows a rank dispatches for a routing map, without building any rows (vectorised; used for
    volume studies and as a cross-check of the dispatcher's counters). Cold path: returns host
    ints, so it syncs on CUDA.

    Returns a dict: ``rows``, ``rows_remote`` (dedup), ``megatron_rows``, ``megatron_rows_remote``,
    ``routed_tokens``, ``ranks_per_token``.
    """
    T, E = routing_map_TE.shape
    rank_mask_TP = routing_map_TE.view(T, ep_size, E // ep_size).any(dim=2)
    rows = int(rank_mask_TP.sum())
    megatron_per_rank_P = routing_map_TE.view(T, ep_size, E // ep_size).sum(dim=(0, 2))
    routed = int(rank_mask_TP.any(dim=1).sum())
    return dict(
        rows=rows,
        rows_remote=rows - int(rank_mask_TP[:, rank].sum()),
        megatron_rows=int(megatron_per_rank_P.sum()),
        megatron_rows_remote=int(megatron_per_rank_P.sum() - megatron_per_rank_P[rank]),
        routed_tokens=routed,
        ranks_per_token=rows / max(routed, 1),
    )


def expected_ranks_per_token_uniform(num_experts: int, topk: int, ep_size: int) -> float:
    """E[distinct destination ranks per token] when each token picks ``topk`` of ``num_experts``
    uniformly without replacement and each of ``ep_size`` ranks owns E/P experts:
    P * (1 - C(E - E/P, k) / C(E, k))  (measured against it in ``docs/comm_volume.md``)."""
    per_rank = num_experts // ep_size
    return ep_size * (
        1 - math.comb(num_experts - per_rank, topk) / math.comb(num_experts, topk)
    )
