"""The one collective the de-duplicating communicator needs: ``all_to_all_single`` with explicit
split sizes, differentiable, allocating on the input's device.

Why ``all_to_all_single`` and not a list ``all_to_all``: gloo (CPU) supports only the single-tensor
form with uneven splits (``docs/hot_path.md``), and NCCL runs it as one fused call. The same code
therefore runs on gloo/CPU in tests and on NCCL/GPU in training; nothing here calls ``torch.cuda``
and nothing here syncs with the host: split sizes arrive as Python ints (the caller read them from
its one count-table copy).

Shape suffixes: see the legend in ``megatron_c2r/comm/__init__.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _check_splits(name: str, splits: Sequence[int], world: int, total: int) -> None:
    if len(splits) != world:
        raise ValueError(
            f"{name} has {len(splits)} entries but the process group has {world} ranks; "
            f"pass one split size per rank"
        )
    if sum(splits) != total:
        raise ValueError(
            f"{name} sums to {sum(splits)} but the tensor has {total} rows; "
            f"split sizes must cover dim 0 exactly"
        )


class _AllToAllSingle(torch.autograd.Function):
    """Autograd wrapper: forward ships rows with (output_splits, input_splits), backward ships the
    gradient rows back with the splits swapped (the transpose of a permutation is its inverse)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # noqa: D401
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all_no_grad(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = _all_to_all_no_grad(
            grad_out.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group
        )
        return grad_in, None, None, None


def _all_to_all_no_grad(x, output_splits, input_splits, group):
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))  # on x's device, x's dtype
    dist.all_to_all_single(
        out,
        x.contiguous(),
        output_split_sizes=list(output_splits),
        input_split_sizes=list(input_splits),
        group=group,
    )
    return out


def all_to_all_single(
    x_R: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with explicit split sizes.

    Args:
        x_R: ``[R, ...]`` rows to send, grouped by destination rank (rank 0's rows first);
            any dtype the backend supports; any device.
        output_splits: length-P Python ints, rows to receive from each rank (sums to Q).
        input_splits: length-P Python ints, rows to send to each rank (sums to R).
        group: the process group (the EP group); ``None`` = the default group.

    Returns:
        ``[Q, ...]`` received rows, grouped by source rank, same dtype and device as ``x_R``.
        With a one-rank group (or no initialised process group) returns ``x_R`` itself: no copy,
        no collective. Collective: every rank of ``group`` must call it with matching splits.
        Backward ships gradients with the splits swapped.
    """
    world = _group_size(group)
    _check_splits("input_splits", input_splits, world, x_R.shape[0])
    _check_splits("output_splits", output_splits, world, sum(output_splits))
    if world == 1:
        return x_R
    return _AllToAllSingle.apply(x_R, list(output_splits), list(input_splits), group)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[R, ...]`` -> ``[R, bytes per row]`` uint8 view (a copy only if ``t`` is not contiguous)."""
    return t.contiguous().view(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8)


def _from_bytes(b_QB: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_as_bytes` for rows shaped and typed like ``like``."""
    fresh = b_QB.clone(memory_format=torch.contiguous_format)  # aligned for any dtype
    return fresh.view(like.dtype).view((b_QB.shape[0],) + tuple(like.shape[1:]))


def _pair_no_grad(a, b, output_splits, input_splits, group):
    """One all-to-all carrying two row-aligned tensors: their bytes side by side."""
    width = math.prod(a.shape[1:]) * a.element_size()  # bytes of one ``a`` row
    a_RB, b_RB = _as_bytes(a), _as_bytes(b)
    packed_QB = _all_to_all_no_grad(torch.cat([a_RB, b_RB], dim=1), output_splits, input_splits, group)
    return _from_bytes(packed_QB[:, :width], a), _from_bytes(packed_QB[:, width:], b)


class _AllToAllPair(torch.autograd.Function):
    """Two row-aligned tensors in one collective each way: forward ships both with
    (output_splits, input_splits), backward ships both gradients with the splits swapped."""

    @staticmethod
    def forward(ctx, a, b, output_splits, input_splits, group):  # noqa: D401
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        ctx.shapes = (a.shape, a.dtype, b.shape, b.dtype)
        return _pair_no_grad(a, b, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        q = sum(ctx.output_splits)
        a_shape, a_dtype, b_shape, b_dtype = ctx.shapes
        if grad_a is None:
            grad_a = torch.zeros((q,) + tuple(a_shape[1:]), dtype=a_dtype, device=grad_b.device)
        if grad_b is None:
            grad_b = torch.zeros((q,) + tuple(b_shape[1:]), dtype=b_dtype, device=grad_a.device)
        ga, gb = _pair_no_grad(grad_a, grad_b, ctx.input_splits, ctx.output_splits, ctx.group)
        return ga, gb, None, None, None


def all_to_all_pair(
    a_R: torch.Tensor,
    b_R: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
):
    """:func:`all_to_all_single` of two row-aligned tensors (e.g. hidden rows and their
    metadata) in ONE collective each way: their bytes travel side by side in one uint8 buffer
    ``[R, bytes(a row) + bytes(b row)]``, unpacked on arrival (one copy per side; no host sync).
    Dtypes may differ. Returns ``(a_Q, b_Q)``; differentiable in both (backward: one collective
    with the splits swapped). One-rank group: returns the inputs themselves."""
    if a_R.shape[0] != b_R.shape[0]:
        raise ValueError(
            f"all_to_all_pair needs row-aligned tensors, got {a_R.shape[0]} and {b_R.shape[0]} "
            "rows; pass one metadata row per hidden row"
        )
    world = _group_size(group)
    _check_splits("input_splits", input_splits, world, a_R.shape[0])
    _check_splits("output_splits", output_splits, world, sum(output_splits))
    if world == 1:
        return a_R, b_R
    return _AllToAllPair.apply(a_R, b_R, list(output_splits), list(input_splits), group)


def exchange_counts(
    counts_PC: torch.Tensor, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Send row ``p`` of a small integer table to rank ``p``; receive one row from every rank.

    Args:
        counts_PC: ``[P, C]`` int64 on any device; row p is what this rank tells rank p.
        group: the EP group.

    Returns:
        ``[P, C]`` int64 on the same device; row p is what rank p told this rank. No autograd.
        Collective on ``group`` (one ``all_to_all_single`` of P*C integers).
    """
    world = _group_size(group)
    if counts_PC.shape[0] != world:
        raise ValueError(
            f"counts_PC has {counts_PC.shape[0]} rows but the group has {world} ranks; "
            f"pass one row per destination rank"
        )
    if world == 1:
        return counts_PC.clone()
    out_PC = torch.empty_like(counts_PC)
    dist.all_to_all_single(out_PC, counts_PC.contiguous(), group=group)
    return out_PC


def reference_all_to_all(
    inputs: Sequence[torch.Tensor], input_splits: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Single-process oracle: what every rank receives when rank ``s`` sends ``inputs[s]`` split by
    ``input_splits[s]``. Returns one tensor per rank: the chunks addressed to it, in source-rank
    order."""
    world = len(inputs)
    chunks = [list(torch.split(x, list(splits))) for x, splits in zip(inputs, input_splits)]
    return [torch.cat([chunks[src][dst] for src in range(world)]) for dst in range(world)]
