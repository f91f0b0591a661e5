"""Routing rules: one small object per routing mode, built once per router.

A rule owns everything that differs between modes, so the router (``moe/router.py``) never
branches on a mode string:

    select(scores_TE, tables)             -> indices_TK   which experts a token may use
    penalty(logits_TE, tables, ...)       -> 0-d fp32     mass outside the rule's allowed set
    violated_T(probs_TE, routing_map_TE, groups_T, tables, active) -> bool [T]   the statistic
    constrained / needs_lists / group_limit                                   schedule facts

``RoutingTables`` holds what a rule derives from the router's buffers (expert -> group map,
top-T lists); the router builds it lazily and drops it in one place after a load or relabelling.

Adding a rule (e.g. node-level, balanced): subclass ``RoutingRule`` (or ``GroupRule``),
override what differs, add one entry to ``RULES`` and the mode name to
``routing.config.MODES``/``GROUP_SELECTIONS``. Pure torch: no Megatron imports, CPU-testable.
Shape suffixes: see the legend in ``megatron_c2r/routing/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional, Type

import torch

from megatron_c2r.routing.functional import (
    allowed_from_top_t,
    c2r_topk,
    group_topk,
    groups_from_expert_to_group,
    validate_groups,
)
from megatron_c2r.routing.penalty import collaboration_penalty, mass_in_group, mass_in_top_t


@dataclasses.dataclass(frozen=True)
class RoutingTables:
    """Read-only tables a rule derives from one router's buffers (rebuilt after load/relabel).

    expert_to_group_E  int64 [E]     the router's ``expert_to_group`` buffer (not a copy)
    groups_GN          int64 [G, N]  expert ids per group, ascending
    top_t_lists_EL     int64 [E, L]  the router's ``top_t_lists`` buffer (L = 0 outside c2r)
    allowed_EE         bool [E, E]   {e} U top_t(e) per expert (c2r only, else None)
    """

    expert_to_group_E: torch.Tensor
    groups_GN: torch.Tensor
    top_t_lists_EL: torch.Tensor
    allowed_EE: Optional[torch.Tensor] = None

    def built_from(self, expert_to_group_E: torch.Tensor, top_t_lists_EL: torch.Tensor) -> bool:
        """True while the router still holds the very tensors these tables were built from
        (``Module.to`` and buffer reassignment replace them; in-place loads do not, which is
        why the router also drops its tables on load)."""
        return self.expert_to_group_E is expert_to_group_E and self.top_t_lists_EL is top_t_lists_EL


class RoutingRule:
    """Base rule: plain top-k selection; the penalty's allowed set and the violation reference
    are the top-1 expert's group (``group_limit`` groups per token allowed).

    Attributes:
        mode: the ``c2r.mode`` value this rule implements.
        constrained: False -> the router delegates selection to Megatron's ``TopKRouter``.
        needs_lists: the rule selects from top-T lists (derived at warm-up end or loaded).
        group_limit: groups per token the violation statistic allows (and, for group rules,
            the constraint itself).
    """

    mode: ClassVar[str] = "topk"
    constrained: ClassVar[bool] = False
    needs_lists: ClassVar[bool] = False

    def __init__(self, *, topk: int, num_groups: int, max_groups: int):
        self.topk = topk
        self.num_groups = num_groups
        self.max_groups = max_groups
        self.group_limit = 1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(topk={self.topk}, num_groups={self.num_groups}, "
                f"group_limit={self.group_limit})")

    # ---- tables --------------------------------------------------------------------------------
    def check_groups(self, expert_to_group_E: torch.Tensor) -> None:
        """Validate the group partition (one-line ValueError). Only rules that limit groups per
        token (``GroupRule``) also need k <= max_groups x E/G; here groups feed statistics and
        the penalty only."""
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.num_groups)

    def tables(self, expert_to_group_E: torch.Tensor, top_t_lists_EL: torch.Tensor) -> RoutingTables:
        """Derive this rule's tables from the router's buffers (no host sync)."""
        groups_GN = groups_from_expert_to_group(expert_to_group_E, self.num_groups)
        return RoutingTables(expert_to_group_E, groups_GN, top_t_lists_EL)

    # ---- selection -----------------------------------------------------------------------------
    def select(self, scores_TE: torch.Tensor, tables: RoutingTables) -> torch.Tensor:
        """int64 [T, K] expert ids per token from the selection scores (higher is better)."""
        return scores_TE.topk(self.topk, dim=-1).indices

    # ---- penalty -------------------------------------------------------------------------------
    def penalty_applies(self, active: bool) -> bool:
        """Whether the collaboration penalty has an allowed set to pull towards now."""
        return True

    def inside_mass_T(
        self, p_TE: torch.Tensor, anchor_T: torch.Tensor, tables: RoutingTables
    ) -> torch.Tensor:
        """fp32 [T]: probability mass inside the anchor's allowed set (here: its group)."""
        return mass_in_group(p_TE, anchor_T, tables.expert_to_group_E, self.num_groups)

    def penalty(
        self,
        logits_TE: torch.Tensor,
        tables: RoutingTables,
        *,
        score_function: str,
        padding_mask_T: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """0-d fp32 collaboration penalty (without its coefficient); see ``routing.penalty``."""
        return collaboration_penalty(
            logits_TE,
            lambda p_TE, anchor_T: self.inside_mass_T(p_TE, anchor_T, tables),
            score_function=score_function,
            padding_mask_T=padding_mask_T,
        )

    # ---- statistics ----------------------------------------------------------------------------
    def violated_T(
        self,
        probs_TE: torch.Tensor,
        routing_map_TE: torch.Tensor,
        groups_T: torch.Tensor,
        tables: RoutingTables,
        active: bool,
    ) -> torch.Tensor:
        """bool [T]: tokens outside the rule (here: using more than ``group_limit`` groups)."""
        return groups_T > self.group_limit


class TopKRule(RoutingRule):
    """``mode='topk'``: Megatron's top-k; the statistics use the 1-group reference."""


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

    def select(self, scores_TE: torch.Tensor, tables: RoutingTables) -> torch.Tensor:
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


class GroupRule(RoutingRule):
    """``mode='group'``, ``group_selection='anchored'``: at most ``max_groups`` groups per
    token, the top-1 expert's group always kept (``routing.functional.group_topk``)."""

    mode = "group"
    constrained = True
    anchored: ClassVar[bool] = True

    def __init__(self, *, topk: int, num_groups: int, max_groups: int):
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups)
        self.group_limit = max_groups

    def check_groups(self, expert_to_group_E: torch.Tensor) -> None:
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.max_groups)

    def select(self, scores_TE: torch.Tensor, tables: RoutingTables) -> torch.Tensor:
        return group_topk(
            scores_TE,
            self.topk,
            tables.expert_to_group_E,
            self.num_groups,
            self.max_groups,
            anchored=self.anchored,
            groups_GN=tables.groups_GN,
        )[1]


class GroupScoreRule(GroupRule):
    """``group_selection='group_score'``: the best ``max_groups`` groups by group score
    (Megatron's group-limited rule over any balanced partition)."""

    anchored = False


# (mode, group_selection or None) -> rule class. One entry per rule.
RULES: Dict[tuple, Type[RoutingRule]] = {
    ("topk", None): TopKRule,
    ("c2r", None): C2RTopTRule,
    ("group", "anchored"): GroupRule,
    ("group", "group_score"): GroupScoreRule,
}


def build_rule(
    mode: str, group_selection: Optional[str], *, topk: int, num_groups: int, max_groups: int
) -> RoutingRule:
    """The rule for a (resolved) router config. ``group_selection`` matters only where a rule is
    registered with one (group mode); other modes ignore it."""
    cls = RULES.get((mode, group_selection)) or RULES.get((mode, None))
    if cls is None:
        known = sorted({m for m, _ in RULES})
        raise ValueError(f"c2r.mode={mode!r} (group_selection={group_selection!r}) has no routing "
                         f"rule: use one of {', '.join(known)}")
    return cls(topk=topk, num_groups=num_groups, max_groups=max_groups)
