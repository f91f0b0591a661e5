"""``mode='c2r'``: the C2R paper's top-T rule."""

from __future__ import annotations

import dataclasses

import torch

from megatron_c2r.routing.functional import allowed_from_top_t, c2r_topk
from megatron_c2r.routing.penalty import mass_in_top_t
from megatron_c2r.routing.rules.base import RoutingRule, RoutingTables


class C2RTopTRule(RoutingRule):
    """``mode='c2r'``: top-1 free, the other k-1 from the top-1 expert's top-T list; the
    allowed set (penalty and violations) is {top-1} U top_t(top-1). Before lists exist (warm-up)
    there is no penalty and violations use the 1-group reference."""

    mode = "c2r"
    constrained = True
    needs_lists = True

    def tables(self, expert_to_group_E: torch.Tensor, top_t_lists_EL: torch.Tensor) -> RoutingTables:
        base = super().tables(expert_to_group_E, top_t_lists_EL)
        allowed_EE = allowed_from_top_t(top_t_lists_EL, expert_to_group_E.numel())
        return dataclasses.replace(base, allowed_EE=allowed_EE)

    def select(self, scores_TE, tables, group_bias_G=None, **inputs):
        return c2r_topk(scores_TE, self.topk, tables.top_t_lists_EL)[1]

    def penalty_applies(self, active: bool) -> bool:
        return active

    def inside_mass_T(self, p_TE, anchor_T, tables):
        return mass_in_top_t(p_TE, anchor_T, tables.top_t_lists_EL)

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        if not active:
            return super().violated_T(probs_TE, routing_map_TE, groups_T, tables, active)
        # Every routed expert inside {top-1} U top_t(top-1); top-1 = the largest prob.
        anchor_T = probs_TE.detach().argmax(dim=-1)
        return (routing_map_TE & ~tables.allowed_EE.index_select(0, anchor_T)).any(dim=1)
