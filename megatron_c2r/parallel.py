"""Parallel-layout arithmetic shared by every layer of the package (pure Python, imports nothing).

The one place for rules such as "the experts split evenly over the EP ranks", so the YAML layer,
the router, the planner and the dispatcher raise the same one-line error for the same mistake.
"""

from __future__ import annotations


def experts_per_rank(
    num_experts: int,
    ep_size: int,
    *,
    experts_name: str = "num_experts",
    ep_name: str = "expert_model_parallel_size",
) -> int:
    """E / P, the experts each EP rank holds. Raises ValueError naming both fields (as the caller
    spells them, e.g. ``megatron.--num-experts``) when P < 1 or P does not divide E."""
    if ep_size < 1:
        raise ValueError(f"{ep_name}={ep_size} must be >= 1")
    if num_experts < 1 or num_experts % ep_size:
        raise ValueError(
            f"{experts_name}={num_experts} must be divisible by {ep_name}={ep_size}: "
            f"pick a divisor of {num_experts}"
        )
    return num_experts // ep_size
