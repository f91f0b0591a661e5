"""The rule interface (``RoutingRule``), the tables rules derive (``RoutingTables``) and plain
top-k (``TopKRule``). See ``routing/rules/__init__.py`` for the interface in one page."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional, Tuple

import torch

from megatron_c2r.routing.functional import groups_from_expert_to_group, validate_groups
from megatron_c2r.routing.penalty import collaboration_penalty, mass_in_group


@dataclasses.dataclass(frozen=True)
class RoutingTables:
    """Read-only tables a rule derives from one router's buffers (rebuilt after load/relabel).

    expert_to_group_E  int64 [E]     the router's ``expert_to_group`` buffer (not a copy)
    groups_GN          int64 [G, N]  expert ids per group, ascending
    top_t_lists_EL     int64 [E, L]  the router's ``top_t_lists`` buffer (L = 0 outside c2r)
    allowed_EE         bool [E, E]   {e} U top_t(e) per expert (c2r only, else None)
    expert_to_node_E   int64 [E]     node per expert, group // P (node rule only, else None)
    nodes_DX           int64 [D, X]  expert ids per node, its groups' rows in order (node rule)
    """

    expert_to_group_E: torch.Tensor
    groups_GN: torch.Tensor
    top_t_lists_EL: torch.Tensor
    allowed_EE: Optional[torch.Tensor] = None
    expert_to_node_E: Optional[torch.Tensor] = None
    nodes_DX: Optional[torch.Tensor] = None

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
        options: ``C2RRouterConfig`` fields the constructor takes beyond the common three.
        group_limit: groups per token the violation statistic allows (and, for group rules,
            the constraint itself).
        num_balance_groups / balance_limit: the groups of ``balance`` and the most of them a
            token may use (M of the communication balance loss).
    """

    mode: ClassVar[str] = "topk"
    constrained: ClassVar[bool] = False
    needs_lists: ClassVar[bool] = False
    options: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, *, topk: int, num_groups: int, max_groups: int):
        self.topk = topk
        self.num_groups = num_groups
        self.max_groups = max_groups
        self.group_limit = 1
        self.num_balance_groups = num_groups
        self.balance_limit = min(topk, num_groups)  # unconstrained: as many as k experts reach

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

    def balance(self, tables: RoutingTables) -> Tuple[torch.Tensor, torch.Tensor]:
        """(expert_to_group_E [E], groups_GN [G, N]) of the groups that the balance losses and
        the group bias act on (``num_balance_groups`` of them): here the router's groups."""
        return tables.expert_to_group_E, tables.groups_GN

    # ---- selection -----------------------------------------------------------------------------
    def select(
        self,
        scores_TE: torch.Tensor,
        tables: RoutingTables,
        group_bias_G: Optional[torch.Tensor] = None,
        **inputs,
    ) -> torch.Tensor:
        """int64 [T, K] expert ids per token from the selection scores (higher is better).
        ``group_bias_G`` fp32 [num_balance_groups]: offsets on the group choice (rules that
        choose groups; the config refuses it for the others). ``inputs``: what the router
        passes from ``router_inputs`` (a scheduled budget, a steered bias); rules without
        such inputs ignore them."""
        return scores_TE.topk(self.topk, dim=-1).indices

    def router_inputs(self, steps_active: int) -> Dict[str, float]:
        """Host values ``select`` takes from the schedule, ``steps_active`` training iterations
        after the constraint switched on (negative during a warm-up). None here."""
        return {}

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

    def extra_stats_T(self, routing_map_TE: torch.Tensor, tables: RoutingTables) -> Dict[str, torch.Tensor]:
        """Rule-specific per-token statistics ({name: float [T]}, averaged by the router)."""
        return {}


class TopKRule(RoutingRule):
    """``mode='topk'``: Megatron's top-k; the statistics use the 1-group reference."""


