"""Hard limits on groups (EP ranks) or nodes per token: anchored (ours) and by group score
(Megatron's group- / node-limited rule)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from megatron_c2r.routing.functional import group_topk, groups_per_token, node_topk, validate_groups
from megatron_c2r.routing.penalty import mass_in_group
from megatron_c2r.routing.rules.base import RoutingRule


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

    # Blocks are what the limit counts: groups here, nodes in NodeRule.
    @property
    def block_limit(self) -> int:
        return self.max_groups

    def select(self, scores_TE, tables, group_bias_G=None, **inputs):
        return self.limited_select(scores_TE, tables, group_bias_G, self.block_limit)

    def limited_select(self, scores_TE, tables, group_bias_G, limit: int) -> torch.Tensor:
        """int64 [T, K]: this rule's selection with ``limit`` blocks per token instead of its own."""
        return group_topk(scores_TE, self.topk, tables.expert_to_group_E, self.num_groups,
                          limit, anchored=self.anchored, groups_GN=tables.groups_GN,
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
        self.nodes_allowed = max_nodes  # what the violation statistic allows
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

    @property
    def block_limit(self) -> int:
        return self.max_nodes

    def select(self, scores_TE, tables, group_bias_G=None, **inputs):
        return self.limited_select(scores_TE, tables, group_bias_G, self.block_limit)

    def limited_select(self, scores_TE, tables, group_bias_G, limit: int) -> torch.Tensor:
        """int64 [T, K]: this rule's selection with ``limit`` nodes per token instead of M."""
        return node_topk(scores_TE, self.topk, tables.groups_GN, self.num_nodes, limit,
                         anchored=self.anchored, max_ranks_per_node=self.max_ranks_per_node,
                         node_bias_D=group_bias_G)[1]  # fmt: skip

    def inside_mass_T(self, p_TE, anchor_T, tables):
        return mass_in_group(p_TE, anchor_T, tables.expert_to_node_E, self.num_nodes)

    def _nodes_T(self, routing_map_TE, tables):
        return groups_per_token(
            routing_map_TE, tables.expert_to_node_E, self.num_nodes, groups_GN=tables.nodes_DX
        )

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        violated_T = self._nodes_T(routing_map_TE, tables) > self.nodes_allowed
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
