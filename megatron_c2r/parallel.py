"""Parallel-layout and batch arithmetic shared by every layer of the package (pure Python, imports
nothing).

The one place for rules such as "the experts split evenly over the EP ranks", so the YAML layer,
the CPU runner, the router, the planner and the dispatcher raise the same one-line error for the
same mistake. Every function takes ints and raises ``ValueError`` naming the fields the way the
caller spells them (``*_name`` keywords: ``megatron.--num-experts`` in a run config,
``--ep`` on the command line, ``num_experts`` in Python); the caller adds where the values came
from (a file, a ``--set``).

Megatron's layout, which these rules encode::

    world = nodes x processes per node
    DP    = world / (TP x PP x CP)             dense layers: data parallel over what is left
    the expert grid EP x ETP divides world / PP  (experts are sharded over EP, then ETP)
    experts per rank = E / EP
    global batch = micro batch x DP x gradient-accumulation steps
"""

from __future__ import annotations


def require_positive(value: int, name: str) -> int:
    """``value`` if it is >= 1, else ValueError ``'<name>=<value> must be >= 1'``."""
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return value


def experts_per_rank(
    num_experts: int,
    ep_size: int,
    *,
    experts_name: str = "num_experts",
    ep_name: str = "expert_model_parallel_size",
) -> int:
    """E / P, the experts each EP rank holds. Raises ValueError naming both fields (as the caller
    spells them, e.g. ``megatron.--num-experts``) when P < 1 or P does not divide E."""
    require_positive(ep_size, ep_name)
    if num_experts < 1 or num_experts % ep_size:
        raise ValueError(
            f"{experts_name}={num_experts} must be divisible by {ep_name}={ep_size}: "
            f"pick a divisor of {num_experts}"
        )
    return num_experts // ep_size


def check_topk(topk: int, num_experts: int, *, topk_name: str = "moe_router_topk",
               experts_name: str = "num_experts") -> int:  # fmt: skip
    """``topk`` if 1 <= k <= E (a token cannot pick more distinct experts than exist)."""
    require_positive(topk, topk_name)
    if topk > num_experts:
        raise ValueError(
            f"{topk_name}={topk} must be <= {experts_name}={num_experts}: lower the top-k or "
            "add experts"
        )
    return topk


def data_parallel_size(
    world_size: int,
    tp: int,
    pp: int,
    cp: int,
    *,
    world_name: str = "world_size",
) -> int:
    """DP = world / (TP x PP x CP); every size must be >= 1 and the product must divide world."""
    for name, value in (("TP", tp), ("PP", pp), ("CP", cp)):
        require_positive(value, name)
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"{world_name}={world_size} is not divisible by TP x PP x CP={tp}x{pp}x{cp}: change "
            "the parallel sizes or the node count"
        )
    return world_size // (tp * pp * cp)


def check_expert_grid(
    world_size: int,
    pp: int,
    ep: int,
    etp: int,
    *,
    ep_name: str = "expert_model_parallel_size",
) -> None:
    """The expert grid EP x ETP must divide world / PP (each pipeline stage holds whole grids)."""
    require_positive(ep, ep_name)
    require_positive(etp, "expert TP")
    if (world_size // pp) % (ep * etp):
        raise ValueError(
            f"{ep_name}={ep} x expert TP={etp} must divide world/PP={world_size // pp}: change "
            "EP or the node count"
        )


def check_global_batch(global_batch: int, micro_batch: int, dp: int, *,
                       global_name: str = "global_batch_size",
                       micro_name: str = "micro_batch_size") -> int:  # fmt: skip
    """Gradient-accumulation steps = global / (micro x DP), which must be a whole number >= 1."""
    require_positive(micro_batch, micro_name)
    require_positive(global_batch, global_name)
    if global_batch % (micro_batch * dp):
        raise ValueError(
            f"{global_name}={global_batch} must be a multiple of {micro_name} x DP="
            f"{micro_batch}x{dp}={micro_batch * dp}"
        )
    return global_batch // (micro_batch * dp)
