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
