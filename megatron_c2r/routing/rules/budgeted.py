"""Budgeted relaxation: a hard limit for most tokens, a row budget spent on the tokens it hurts most.

Every token first gets the anchored rule with M blocks (``max_groups`` groups or ``max_nodes``
nodes). The same rule with ``relax_to`` blocks (default: all, i.e. plain top-k) is the relaxed
choice. Tokens are ranked by a criterion (``relax_by``) and relaxed in that order while the
batch's mean blocks per token stays <= ``mean_budget``; tokens whose relaxed choice uses no more
blocks than the base one are relaxed for free. All of it is tensor code: two limited selections,
one sort and one cumulative sum over tokens, no host sync, O(T x E) memory. The budget holds per
micro-batch and rank over every token the router sees (padding included: rules do not see the
padding mask), so the run's mean nodes per token is at most the budget.

Criteria (higher = relaxed first), all from the selection scores the router ranks:
    score_lost    sum of the relaxed choice's k scores minus the base choice's (what the limit
                  costs the token in routing score; 0 when both choices agree)
    best_outside  the best score outside the base choice's blocks minus the lowest score the
                  base choice kept (how much the best excluded expert beats the worst kept one)
    entropy       the entropy of softmax(scores) (spread-out tokens first)

``budget_ramp_steps`` anneals the budget from ``relax_to`` (every token relaxed) to
``mean_budget`` over that many iterations after the warm-up (``router_inputs``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_c2r.routing.functional import groups_per_token
from megatron_c2r.routing.rules.limited import GroupRule, NodeRule

RELAX_CRITERIA = ("score_lost", "best_outside", "entropy")


def blocks_of_selection_T(indices_TK: torch.Tensor, block_of_E: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """int64 [T]: distinct blocks (groups, nodes) holding each token's selected experts."""
    blocks_TK = block_of_E.index_select(0, indices_TK.flatten()).view_as(indices_TK)
    used_TB = torch.zeros(indices_TK.shape[0], num_blocks, dtype=torch.bool, device=indices_TK.device)
    return used_TB.scatter_(1, blocks_TK, True).sum(dim=1)


def relax_criterion_T(
    criterion: str,
    scores_TE: torch.Tensor,
    base_TK: torch.Tensor,
    relaxed_TK: torch.Tensor,
    block_of_E: torch.Tensor,
    num_blocks: int,
) -> torch.Tensor:
    """fp32 [T]: how much each token wants relaxing (see the module docstring)."""
    scores_TE = scores_TE.detach()
    if criterion == "score_lost":  # [T, K] gathers in fp32: no fp32 copy of the [T, E] scores
        return scores_TE.gather(1, relaxed_TK).float().sum(dim=1) - scores_TE.gather(1, base_TK).float().sum(dim=1)
    scores_TE = scores_TE.float()
    if criterion == "best_outside":
        num_tokens, num_experts = scores_TE.shape
        blocks_TK = block_of_E.index_select(0, base_TK.flatten()).view_as(base_TK)
        kept_TB = torch.zeros(num_tokens, num_blocks, dtype=torch.bool, device=scores_TE.device)
        kept_TB.scatter_(1, blocks_TK, True)
        inside_TE = kept_TB.gather(1, block_of_E.unsqueeze(0).expand(num_tokens, num_experts))
        best_outside_T = scores_TE.masked_fill(inside_TE, float("-inf")).amax(dim=1)
        margin_T = best_outside_T - scores_TE.gather(1, base_TK).amin(dim=1)
        return margin_T.nan_to_num(neginf=float("-inf"))  # no block outside: never worth relaxing
    if criterion == "entropy":
        logp_TE = torch.log_softmax(scores_TE, dim=1)
        return -(logp_TE.exp() * logp_TE).sum(dim=1)
    raise ValueError(f"c2r.relax_by={criterion!r} must be one of {', '.join(RELAX_CRITERIA)}")


def budgeted_choice(
    base_TK: torch.Tensor,
    relaxed_TK: torch.Tensor,
    want_T: torch.Tensor,
    base_blocks_T: torch.Tensor,
    relaxed_blocks_T: torch.Tensor,
    mean_budget: float,
) -> torch.Tensor:
    """int64 [T, K]: the relaxed choice for the tokens that want it most while the mean blocks
    per token stays <= ``mean_budget`` (tokens whose relaxed choice costs no extra block are
    relaxed regardless), the base choice for the rest. Sort + cumulative sum: no host sync."""
    num_tokens = base_TK.shape[0]
    extra_T = (relaxed_blocks_T - base_blocks_T).clamp(min=0)
    allowance = mean_budget * num_tokens - base_blocks_T.sum()  # 0-d tensor: blocks left to spend
    order_T = want_T.argsort(descending=True, stable=True)
    fits_sorted_T = extra_T.index_select(0, order_T).cumsum(dim=0) <= allowance
    relax_T = torch.zeros_like(fits_sorted_T).scatter(0, order_T, fits_sorted_T) | (extra_T == 0)
    return torch.where(relax_T.unsqueeze(1), relaxed_TK, base_TK)


class _Budgeted:
    """The budgeted selection on top of a limited rule (``GroupRule`` / ``NodeRule``): mixed in
    before it, so everything but ``select`` and the statistic is the base rule's."""

    options = ("mean_budget", "relax_to", "relax_by", "budget_ramp_steps")

    def _init_budget(self, mean_budget: float, relax_to: Optional[int], relax_by: str,
                     budget_ramp_steps: int, num_blocks: int) -> None:
        self.relax_to = num_blocks if relax_to is None else relax_to
        self.mean_budget = float(mean_budget)
        self.relax_by = relax_by
        self.budget_ramp_steps = budget_ramp_steps
        if relax_by not in RELAX_CRITERIA:
            raise ValueError(f"c2r.relax_by={relax_by!r} must be one of {', '.join(RELAX_CRITERIA)}")
        if not self.block_limit < self.relax_to <= num_blocks:
            raise ValueError(
                f"c2r.relax_to={self.relax_to} must be in ({self.block_limit}, {num_blocks}] (more "
                "blocks than the base limit, at most all): raise it or drop c2r.mean_budget"
            )
        if not self.block_limit <= self.mean_budget <= self.relax_to:
            raise ValueError(
                f"c2r.mean_budget={mean_budget} must be in [{self.block_limit}, {self.relax_to}] "
                "(the base limit .. c2r.relax_to blocks per token)"
            )
        # The communication balance loss's M: the most blocks a token may reach.
        self.balance_limit = self.relax_to

    def budget_at(self, steps_active: int) -> float:
        """The mean budget ``steps_active`` iterations after the warm-up: ``relax_to`` (no limit)
        annealed linearly to ``mean_budget`` over ``budget_ramp_steps``."""
        if self.budget_ramp_steps <= 0:
            return self.mean_budget
        done = min(1.0, max(0.0, steps_active / self.budget_ramp_steps))
        return self.relax_to + (self.mean_budget - self.relax_to) * done

    def router_inputs(self, steps_active: int) -> Dict[str, float]:
        return {"mean_budget": self.budget_at(steps_active)}

    def select(self, scores_TE, tables, group_bias_G=None, *, mean_budget: Optional[float] = None, **inputs):
        budget = self.mean_budget if mean_budget is None else mean_budget
        base_TK = self.limited_select(scores_TE, tables, group_bias_G, self.block_limit)
        if budget <= self.block_limit:  # nothing to spend (host float: no sync)
            return base_TK
        relaxed_TK = self.limited_select(scores_TE, tables, group_bias_G, self.relax_to)
        block_of_E, _ = self.balance(tables)
        num_blocks = self.num_balance_groups
        want_T = relax_criterion_T(self.relax_by, scores_TE, base_TK, relaxed_TK, block_of_E, num_blocks)
        return budgeted_choice(
            base_TK, relaxed_TK, want_T,
            blocks_of_selection_T(base_TK, block_of_E, num_blocks),
            blocks_of_selection_T(relaxed_TK, block_of_E, num_blocks),
            budget,
        )  # fmt: skip

    def extra_stats_T(self, routing_map_TE, tables):
        """``relaxed_share``: tokens on more blocks than the base limit."""
        return {"relaxed_share": (self._blocks_T(routing_map_TE, tables) > self.block_limit).float()}


class BudgetedGroupRule(_Budgeted, GroupRule):
    """``mode='group'`` with ``c2r.mean_budget``: anchored M groups, relaxed to ``relax_to``
    groups for the tokens that lose most, mean groups per token <= the budget. The statistic
    flags tokens on more than ``relax_to`` groups (never under the rule)."""

    options = _Budgeted.options

    def __init__(self, *, topk, num_groups, max_groups, mean_budget, relax_to=None,
                 relax_by="score_lost", budget_ramp_steps=0):
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups)
        self._init_budget(mean_budget, relax_to, relax_by, budget_ramp_steps, num_groups)
        self.group_limit = self.relax_to

    def _blocks_T(self, routing_map_TE, tables):
        return groups_per_token(routing_map_TE, tables.expert_to_group_E, self.num_groups,
                                groups_GN=tables.groups_GN)  # fmt: skip


class BudgetedNodeRule(_Budgeted, NodeRule):
    """``mode='node'`` with ``c2r.mean_budget``: anchored M nodes, relaxed to ``relax_to``
    nodes for the tokens that lose most, mean nodes per token <= the budget. The statistic
    flags tokens on more than ``relax_to`` nodes (or more than Q ranks of one node)."""

    options = NodeRule.options + _Budgeted.options

    def __init__(self, *, topk, num_groups, max_groups, num_nodes, max_nodes=None,
                 max_ranks_per_node=None, mean_budget, relax_to=None, relax_by="score_lost",
                 budget_ramp_steps=0):
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups, num_nodes=num_nodes,
                         max_nodes=max_nodes, max_ranks_per_node=max_ranks_per_node)  # fmt: skip
        self._init_budget(mean_budget, relax_to, relax_by, budget_ramp_steps, num_nodes)
        self.nodes_allowed = self.relax_to
        self.group_limit = self.relax_to * (max_ranks_per_node or self.ranks_per_node)

    def _blocks_T(self, routing_map_TE, tables):
        return self._nodes_T(routing_map_TE, tables)
