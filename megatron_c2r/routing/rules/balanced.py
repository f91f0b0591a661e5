"""``mode='group_balanced'``: MoGE (Pangu Pro MoE)."""

from __future__ import annotations

import torch

from megatron_c2r.routing.config import check_group_balanced
from megatron_c2r.routing.functional import validate_groups
from megatron_c2r.routing.moge import experts_per_group_TG, group_balanced_topk
from megatron_c2r.routing.rules.base import RoutingRule


class GroupBalancedRule(RoutingRule):
    """``mode='group_balanced'``: MoGE (Pangu Pro MoE). Exactly k/G experts from each of the G
    groups per token (``routing.moge.group_balanced_topk``; G | k or a one-line error), so every
    group gets T x k/G (token, expert) pairs per micro-batch: device balance by construction,
    every token on all G groups. No penalty (there is no smaller allowed set: the config refuses
    ``penalty_coeff``) and no group choice (no group bias). Megatron's aux losses and expert
    bias act inside the groups as in any rule; the device balance loss over these groups has
    nothing left to balance. The statistic flags tokens with more than k/G experts in some
    group (never under the rule; plain top-k's reference during a warm-up)."""

    mode = "group_balanced"
    constrained = True

    def __init__(self, *, topk: int, num_groups: int, max_groups: int):
        check_group_balanced(topk, num_groups)
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups)
        self.per_group = topk // num_groups
        self.group_limit = num_groups
        self.balance_limit = num_groups

    def check_groups(self, expert_to_group_E: torch.Tensor) -> None:
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.num_groups)

    def select(self, scores_TE, tables, group_bias_G=None, **inputs):
        return group_balanced_topk(scores_TE, self.topk, tables.groups_GN)[1]

    def penalty_applies(self, active: bool) -> bool:
        return False

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        return (experts_per_group_TG(routing_map_TE, tables.groups_GN) > self.per_group).any(dim=1)
