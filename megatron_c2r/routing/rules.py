"""Routing rules: one small object per routing mode, built once per router.

A rule owns everything that differs between modes, so the router (``moe/router.py``) never
branches on a mode string:

    select(scores_TE, tables, group_bias_G)  -> indices_TK   which experts a token may use
    penalty(logits_TE, tables, ...)          -> 0-d fp32     mass outside the rule's allowed set
    violated_T(probs_TE, routing_map_TE, groups_T, tables, active) -> bool [T]   the statistic
    extra_stats_T(routing_map_TE, tables)    -> {name: [T]}  rule-specific statistics
    balance(tables)                          -> the groups balance losses / group bias act on
    constrained / needs_lists / group_limit / balance_limit                   schedule facts

``RoutingTables`` holds what a rule derives from the router's buffers (expert -> group map,
top-T lists, nodes); the router builds it lazily and drops it in one place after a load or
relabelling.

Adding a rule (e.g. balanced): subclass ``RoutingRule`` (or ``GroupRule``), override what
differs, name the extra config fields its constructor takes in ``options``, add one entry to
``RULES`` and the mode name to ``routing.config.MODES``/``GROUP_SELECTIONS``. Pure torch: no
Megatron imports, CPU-testable. Shape suffixes: see the legend in
``megatron_c2r/routing/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch

from megatron_c2r.routing.functional import (
    allowed_from_top_t,
    c2r_topk,
    group_topk,
    groups_from_expert_to_group,
    groups_per_token,
    node_topk,
    validate_groups,
)
from megatron_c2r.routing.config import check_group_balanced
from megatron_c2r.routing.moge import experts_per_group_TG, group_balanced_topk
from megatron_c2r.routing.penalty import collaboration_penalty, mass_in_group, mass_in_top_t


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
    ) -> torch.Tensor:
        """int64 [T, K] expert ids per token from the selection scores (higher is better).
        ``group_bias_G`` fp32 [num_balance_groups]: offsets on the group choice (rules that
        choose groups; the config refuses it for the others)."""
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

    def extra_stats_T(self, routing_map_TE: torch.Tensor, tables: RoutingTables) -> Dict[str, torch.Tensor]:
        """Rule-specific per-token statistics ({name: float [T]}, averaged by the router)."""
        return {}


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

    def select(self, scores_TE, tables, group_bias_G=None):
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
        self.balance_limit = max_groups

    def check_groups(self, expert_to_group_E: torch.Tensor) -> None:
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.max_groups)

    def select(self, scores_TE, tables, group_bias_G=None):
        return group_topk(scores_TE, self.topk, tables.expert_to_group_E, self.num_groups,
                          self.max_groups, anchored=self.anchored, groups_GN=tables.groups_GN,
                          group_bias_G=group_bias_G)[1]  # fmt: skip


class GroupScoreRule(GroupRule):
    """``group_selection='group_score'``: the best ``max_groups`` groups by group score
    (Megatron's group-limited rule over any balanced partition)."""

    anchored = False


class NodeRule(RoutingRule):
    """``mode='node'``, ``group_selection='anchored'``: groups = nodes. The top-1 expert's node
    plus the best M-1 other nodes by node score, plain top-k inside them; with
    ``max_ranks_per_node`` = Q also at most Q groups (EP ranks) per kept node, each node
    anchored on its own best expert (``routing.functional.node_topk``). Nodes are contiguous
    blocks of P = G / D groups. Penalty and balance act on nodes; the statistic flags tokens on
    more than M nodes or more than Q ranks of one node."""

    mode = "node"
    constrained = True
    anchored: ClassVar[bool] = True
    options = ("num_nodes", "max_nodes", "max_ranks_per_node")

    def __init__(
        self,
        *,
        topk: int,
        num_groups: int,
        max_groups: int,
        num_nodes: int,
        max_nodes: Optional[int] = None,
        max_ranks_per_node: Optional[int] = None,
    ):
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups)
        max_nodes = 1 if max_nodes is None else max_nodes
        if num_nodes < 1 or num_groups % num_nodes or not 1 <= max_nodes <= num_nodes:
            raise ValueError(
                f"num_nodes={num_nodes} must divide num_groups={num_groups} and max_nodes="
                f"{max_nodes} be in [1, num_nodes]: fix the node layout"
            )
        self.num_nodes, self.max_nodes = num_nodes, max_nodes
        self.ranks_per_node = num_groups // num_nodes
        if max_ranks_per_node is not None and not 1 <= max_ranks_per_node <= self.ranks_per_node:
            raise ValueError(
                f"max_ranks_per_node={max_ranks_per_node} must be in [1, {self.ranks_per_node}] "
                "(groups per node)"
            )
        self.max_ranks_per_node = max_ranks_per_node
        self.group_limit = max_nodes * (max_ranks_per_node or self.ranks_per_node)
        self.num_balance_groups = num_nodes
        self.balance_limit = max_nodes

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(topk={self.topk}, num_groups={self.num_groups}, "
                f"num_nodes={self.num_nodes}, max_nodes={self.max_nodes}, "
                f"max_ranks_per_node={self.max_ranks_per_node})")

    def check_groups(self, expert_to_group_E: torch.Tensor) -> None:
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.num_groups)
        per_group = expert_to_group_E.numel() // self.num_groups
        if self.topk > self.group_limit * per_group:
            raise ValueError(
                f"topk={self.topk} exceeds the {self.max_nodes} node(s) x "
                f"{self.group_limit // self.max_nodes} group(s) x {per_group} experts available "
                "under the constraint: raise max_nodes / max_ranks_per_node or lower topk"
            )

    def tables(self, expert_to_group_E, top_t_lists_EL):
        base = super().tables(expert_to_group_E, top_t_lists_EL)
        return dataclasses.replace(
            base,
            expert_to_node_E=torch.div(expert_to_group_E, self.ranks_per_node, rounding_mode="floor"),
            nodes_DX=base.groups_GN.reshape(self.num_nodes, -1),
        )

    def balance(self, tables):
        return tables.expert_to_node_E, tables.nodes_DX

    def select(self, scores_TE, tables, group_bias_G=None):
        return node_topk(scores_TE, self.topk, tables.groups_GN, self.num_nodes, self.max_nodes,
                         anchored=self.anchored, max_ranks_per_node=self.max_ranks_per_node,
                         node_bias_D=group_bias_G)[1]  # fmt: skip

    def inside_mass_T(self, p_TE, anchor_T, tables):
        return mass_in_group(p_TE, anchor_T, tables.expert_to_node_E, self.num_nodes)

    def _nodes_T(self, routing_map_TE, tables):
        return groups_per_token(
            routing_map_TE, tables.expert_to_node_E, self.num_nodes, groups_GN=tables.nodes_DX
        )

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        violated_T = self._nodes_T(routing_map_TE, tables) > self.max_nodes
        if self.max_ranks_per_node is not None:
            num_tokens = routing_map_TE.shape[0]
            ranks_TG = routing_map_TE.index_select(1, tables.groups_GN.flatten()).view(
                num_tokens, self.num_groups, -1
            ).any(dim=2)
            ranks_TD = ranks_TG.view(num_tokens, self.num_nodes, self.ranks_per_node).sum(dim=2)
            violated_T = violated_T | (ranks_TD > self.max_ranks_per_node).any(dim=1)
        return violated_T


class NodeScoreRule(NodeRule):
    """``mode='node'``, ``group_selection='group_score'``: the best M nodes by node score:
    Megatron's group-limited routing with groups = nodes (DeepSeek-V3's node-limited rule)."""

    anchored = False


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

    def select(self, scores_TE, tables, group_bias_G=None):
        return group_balanced_topk(scores_TE, self.topk, tables.groups_GN)[1]

    def penalty_applies(self, active: bool) -> bool:
        return False

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        return (experts_per_group_TG(routing_map_TE, tables.groups_GN) > self.per_group).any(dim=1)


# (mode, group_selection or None) -> rule class. One entry per rule.
RULES: Dict[tuple, Type[RoutingRule]] = {
    ("topk", None): TopKRule,
    ("c2r", None): C2RTopTRule,
    ("group", "anchored"): GroupRule,
    ("group", "group_score"): GroupScoreRule,
    ("node", "anchored"): NodeRule,
    ("node", "group_score"): NodeScoreRule,
    ("group_balanced", None): GroupBalancedRule,
}


def build_rule(
    mode: str,
    group_selection: Optional[str],
    *,
    topk: int,
    num_groups: int,
    max_groups: int,
    **options,
) -> RoutingRule:
    """The rule for a (resolved) router config. ``group_selection`` matters only where a rule is
    registered with one (group and node modes); other modes ignore it. ``options``: the extra
    fields the rule's class names in ``options`` (e.g. the node layout)."""
    cls = RULES.get((mode, group_selection)) or RULES.get((mode, None))
    if cls is None:
        known = sorted({m for m, _ in RULES})
        raise ValueError(f"c2r.mode={mode!r} (group_selection={group_selection!r}) has no routing "
                         f"rule: use one of {', '.join(known)}")
    return cls(topk=topk, num_groups=num_groups, max_groups=max_groups, **options)


def rule_for_config(cfg, *, topk: int) -> RoutingRule:
    """The rule of a resolved ``C2RRouterConfig`` (``cfg.resolve(...)``): its mode, selection and
    the fields its class takes (``options``)."""
    cls = RULES.get((cfg.mode, cfg.group_selection)) or RULES.get((cfg.mode, None))
    options = {name: getattr(cfg, name) for name in getattr(cls, "options", ())}
    return build_rule(cfg.mode, cfg.group_selection, topk=topk, num_groups=cfg.num_groups,
                      max_groups=cfg.max_groups, **options)
