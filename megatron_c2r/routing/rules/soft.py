"""Soft locality bias: a steered offset toward the anchored blocks instead of a hard limit.

Selection runs on ``s + delta * 1[expert in the anchored block set]``: the anchored rule's M
blocks (the top-1 expert's group / node plus the best M-1 others by block score) get ``delta``
added to their experts' scores, then plain top-k. Probs come from the unbiased scores (the
router computes them for the selection, as for every rule). ``delta`` (fp32, >= 0, in units of
the selection scores) lives on the router (``locality_bias``, saved in checkpoints) and is moved
by +-``c2r.locality_bias_rate`` after every iteration toward ``c2r.locality_bias_target`` mean
blocks per token: the sign rule of Megatron's expert bias (``update_locality_bias``). delta = 0
is plain top-k; a large delta is the anchored M-block rule. No host sync, O(T x E).
"""

from __future__ import annotations

import torch

from megatron_c2r.routing.functional import _keep_best_blocks, groups_per_token, validate_groups
from megatron_c2r.routing.rules.limited import GroupRule, NodeRule


def soft_locality_topk(
    scores_TE: torch.Tensor,
    topk: int,
    block_of_E: torch.Tensor,
    blocks_BX: torch.Tensor,
    keep: int,
    delta: torch.Tensor,
    block_bias_B=None,
) -> torch.Tensor:
    """int64 [T, K]: top-k of ``scores_TE + delta`` on the experts of each token's anchored
    ``keep`` blocks (``blocks_BX``: expert ids per block; ``block_bias_B``: offsets on the block
    choice, as the hard rules take)."""
    num_tokens, num_experts = scores_TE.shape
    num_blocks = blocks_BX.shape[0]
    scores_TBX = scores_TE.index_select(1, blocks_BX.flatten()).view(num_tokens, num_blocks, -1)
    kept_TM = _keep_best_blocks(scores_TBX, topk, keep, anchored=True, bias_G=block_bias_B)
    kept_TB = torch.zeros(num_tokens, num_blocks, dtype=torch.bool, device=scores_TE.device)
    kept_TB.scatter_(1, kept_TM, True)
    inside_TE = kept_TB.gather(1, block_of_E.unsqueeze(0).expand(num_tokens, num_experts))
    biased_TE = scores_TE + inside_TE.to(scores_TE.dtype) * delta.to(scores_TE.dtype)
    return biased_TE.topk(topk, dim=1).indices


@torch.no_grad()
def updated_locality_bias(delta: torch.Tensor, blocks_and_tokens_2: torch.Tensor, target: float,
                          rate: float) -> torch.Tensor:
    """fp32 0-d: ``delta + rate * sign(mean blocks per token - target)``, at least 0.
    ``blocks_and_tokens_2`` = (sum of blocks per token, tokens) summed over the ranks that route;
    no tokens -> unchanged."""
    blocks, tokens = blocks_and_tokens_2.float().unbind()
    step = torch.sign(blocks - target * tokens) * rate  # sign(mean - target), 0 with no tokens
    return (delta.float() + step).clamp(min=0.0)


class _SoftLocality:
    """The soft selection on top of a limited rule's anchored block choice (mixed in first)."""

    options = ("locality_bias_target", "locality_bias_rate")
    anchored = True

    def _init_soft(self, target: float, rate: float, num_blocks: int) -> None:
        if not 1.0 <= target <= num_blocks:
            raise ValueError(
                f"c2r.locality_bias_target={target} must be in [1, {num_blocks}] blocks per token"
            )
        self.locality_bias_target, self.locality_bias_rate = float(target), float(rate)
        self.balance_limit = num_blocks  # any token may reach every block

    def select(self, scores_TE, tables, group_bias_G=None, *, locality_bias=None, **inputs):
        if locality_bias is None:
            raise ValueError(
                "the soft locality rule needs the router's locality_bias (C2RRouter passes it)"
            )
        block_of_E, blocks_BX = self.balance(tables)
        return soft_locality_topk(scores_TE, self.topk, block_of_E, blocks_BX, self.block_limit,
                                  locality_bias, block_bias_B=group_bias_G)  # fmt: skip

    def blocks_T(self, routing_map_TE, tables) -> torch.Tensor:
        """int64 [T]: distinct blocks (groups or nodes) per token (what the controller steers)."""
        block_of_E, blocks_BX = self.balance(tables)
        return groups_per_token(routing_map_TE, block_of_E, self.num_balance_groups, groups_GN=blocks_BX)

    def violated_T(self, probs_TE, routing_map_TE, groups_T, tables, active):
        """Tokens beyond the anchored M blocks (a soft rule allows them; the share is the
        statistic)."""
        return self.blocks_T(routing_map_TE, tables) > self.block_limit


class SoftGroupRule(_SoftLocality, GroupRule):
    """``mode='group'`` with ``c2r.locality_bias_target``: a steered bias toward the anchored
    ``max_groups`` groups, mean groups per token steered to the target."""

    options = _SoftLocality.options

    def __init__(self, *, topk, num_groups, max_groups, locality_bias_target, locality_bias_rate):
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups)
        self._init_soft(locality_bias_target, locality_bias_rate, num_groups)
        self.group_limit = num_groups

    def check_groups(self, expert_to_group_E):
        """The partition alone: any k fits, since tokens may leave the anchored groups."""
        validate_groups(expert_to_group_E, self.num_groups, self.topk, self.num_groups)


class SoftNodeRule(_SoftLocality, NodeRule):
    """``mode='node'`` with ``c2r.locality_bias_target``: a steered bias toward the anchored
    ``max_nodes`` nodes, mean nodes per token steered to the target."""

    options = NodeRule.options + _SoftLocality.options

    def __init__(self, *, topk, num_groups, max_groups, num_nodes, max_nodes=None,
                 max_ranks_per_node=None, locality_bias_target, locality_bias_rate):
        if max_ranks_per_node is not None:
            raise ValueError(
                f"c2r.max_ranks_per_node={max_ranks_per_node} limits ranks inside hard node "
                "sets; the soft locality bias has none: drop one of them"
            )
        super().__init__(topk=topk, num_groups=num_groups, max_groups=max_groups,
                         num_nodes=num_nodes, max_nodes=max_nodes)  # fmt: skip
        self._init_soft(locality_bias_target, locality_bias_rate, num_nodes)
        self.group_limit = num_groups
