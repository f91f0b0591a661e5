"""``C2RRouterConfig``: the router's options, validated once (pure: no Megatron imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_c2r.parallel import experts_per_rank

MODES = ("topk", "c2r", "group")
GROUP_SELECTIONS = ("anchored", "group_score")


def experts_per_group(
    num_experts: int,
    num_groups: int,
    *,
    groups_name: str = "c2r.num_groups",
    experts_name: str = "num_moe_experts",
) -> int:
    """E / G, the experts in each of ``num_groups`` balanced groups: the EP rule
    (``parallel.experts_per_rank``, one source for "parts split the experts evenly") with the
    group fields named in its one-line error."""
    return experts_per_rank(num_experts, num_groups, experts_name=experts_name, ep_name=groups_name)


@dataclass(frozen=True, kw_only=True)
class C2RRouterConfig:
    """Collaboration-constrained routing options (one instance per model; all MoE layers share it).

    mode: 'group' (default, the flagship) keeps each token inside at most ``max_groups`` groups,
        the top-1 expert's group first; 'c2r' is the paper's rule (top-1 free, the other k-1 from
        the top-1 expert's top-T collaborators); 'topk' is Megatron's TopKRouter, bit for bit, plus
        the collaboration tracker and optional penalty.
    top_t: length of the collaborator ("top-T") lists (c2r). top_t = E-1 is plain top-k.
    num_groups: G, number of groups (group mode, penalty). None -> the EP size, so one group is
        one EP rank's expert block (after any placement relabelling).
    max_groups: M, groups a token may use (group mode). 1 -> every token is sent to one rank.
    group_selection: 'anchored' (top-1 expert's group + best other groups; lower loss than
        Megatron's rule at equal ranks per token, see docs/quality.md) or 'group_score' (the
        best M groups by group score: Megatron's group-limited rule).
    expert_to_group: explicit balanced partition (length E, group id per expert). None -> the
        contiguous blocks of E/G ids, i.e. the EP ranks' expert sets.
    penalty_coeff: collaboration penalty coefficient (0 = off). See routing/penalty.py.
    warmup_steps: plain top-k for this many training steps while the tracker collects
        collaboration; then top-T lists are derived and the constraint turns on. Pretraining has
        no lists at step 0. 0 -> constrained from the start (c2r then needs lists from a file).
    refresh_interval: every R steps after warm-up, re-derive the top-T lists (c2r) or, in the
        CPU trainer, re-plan the placement (group) from what plain top-k would have picked over
        those R steps (the constrained map itself would only confirm the current groups; this
        costs one top-k per forward while on). 0 = frozen after warm-up, as in the paper.
    track_collaboration: count co-activation on every training forward (needed for warm-up,
        refresh and placement planning).
    check_finite_logits: raise on NaN/Inf router logits before they reach a collective. In a
        stock Megatron MoELayer this costs one small device->host sync per layer; our
        C2RMoELayer defers it into the dispatcher's count exchange (no extra sync; see
        ``C2RRouter.defer_finite_check``).
    """

    mode: str = "group"
    top_t: Optional[int] = None
    num_groups: Optional[int] = None
    max_groups: int = 1
    group_selection: str = "anchored"
    expert_to_group: Optional[Tuple[int, ...]] = None
    penalty_coeff: float = 0.0
    warmup_steps: int = 0
    refresh_interval: int = 0
    track_collaboration: bool = True
    check_finite_logits: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"c2r.mode={self.mode!r} must be one of {', '.join(MODES)}")
        if self.group_selection not in GROUP_SELECTIONS:
            raise ValueError(
                f"c2r.group_selection={self.group_selection!r} must be one of "
                f"{', '.join(GROUP_SELECTIONS)}"
            )
        for name in ("warmup_steps", "refresh_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"c2r.{name}={getattr(self, name)} must be >= 0")
        if self.penalty_coeff < 0:
            raise ValueError(f"c2r.penalty_coeff={self.penalty_coeff} must be >= 0 (0 = off)")
        if self.mode == "c2r" and self.top_t is None:
            raise ValueError("c2r.top_t is required for mode='c2r' (e.g. top_t: 5 for E=8, k=2)")
        if self.expert_to_group is not None:
            object.__setattr__(self, "expert_to_group", tuple(int(g) for g in self.expert_to_group))

    def resolve(self, *, num_experts: int, topk: int, ep_size: int) -> "C2RRouterConfig":
        """Fill defaults that depend on the model (num_groups <- EP size) and validate against it.
        Errors name the field, the values and the fix."""
        if not 1 <= topk <= num_experts:  # first: the group checks below assume it
            raise ValueError(
                f"moe_router_topk={topk} must be in [1, num_moe_experts={num_experts}]: lower "
                "moe_router_topk or raise num_moe_experts"
            )
        num_groups = self.num_groups
        if num_groups is None and self.expert_to_group:
            num_groups = len(set(self.expert_to_group))
        if num_groups is None:  # one group per EP rank: the EP rule
            experts_per_rank(num_experts, ep_size, experts_name="num_moe_experts")
            num_groups = ep_size
        experts_per_group(num_experts, num_groups)
        if self.mode == "c2r" and not topk - 1 <= self.top_t <= num_experts - 1:
            raise ValueError(
                f"c2r.top_t={self.top_t} must satisfy moe_router_topk-1={topk - 1} <= top_t <= "
                f"num_moe_experts-1={num_experts - 1}"
            )
        if self.mode == "group":
            if not 1 <= self.max_groups <= num_groups:
                raise ValueError(
                    f"c2r.max_groups={self.max_groups} must be in [1, num_groups={num_groups}]"
                )
            if topk > self.max_groups * (num_experts // num_groups):
                raise ValueError(
                    f"moe_router_topk={topk} exceeds c2r.max_groups={self.max_groups} x "
                    f"{num_experts // num_groups} experts per group: raise c2r.max_groups"
                )
        if self.expert_to_group is not None and len(self.expert_to_group) != num_experts:
            raise ValueError(
                f"c2r.expert_to_group has {len(self.expert_to_group)} entries, expected "
                f"num_moe_experts={num_experts}"
            )
        return dataclasses.replace(self, num_groups=num_groups)
