"""Balance at the group level: DeepSeek-V2's device- and communication-level balance losses and
an aux-loss-free per-group bias, over any balanced partition of the experts into groups (the
router's balance groups: EP ranks in group mode, nodes in node mode; ``RoutingRule.balance``).

Formulas (DeepSeek-V2, arXiv 2405.04434, sections 2.2.2-2.2.4; its coefficients: a2 = 0.05,
a3 = 0.02). T tokens, K experts per token, G groups of E/G experts, M groups a token may use,
s_{i,t} the router's full distribution (softmax, or sum-normalised sigmoid: Megatron's aux-loss
scores):

    P_g   = (1/T) sum_t sum_{i in g} s_{i,t}                   (probability mass on group g)
    device:        f'_g  = (G / (K T)) * #(token, expert) pairs routed into g
    communication: f''_g = (G / (M T)) * #tokens sent to g (at least one expert in g)
    L_dev = sum_g f'_g P_g,   L_comm = sum_g f''_g P_g          (times coefficients a2, a3)

Both equal 1 when routing and mass are uniform (and every token uses exactly M groups), like
Megatron's expert-level aux loss. Distributed, exactly as Megatron's ``switch_load_balancing_
loss_func``: the counts are summed over the ranks that share the tokens' sequence (TP x CP),
T is that group's token count, the mass is this rank's; each rank's loss is its share and the
shares add up to the formula (the logging tracker sums them, then averages over DP).

Group bias (DeepSeek-V3's aux-loss-free rule moved from experts to groups): b_g is added to the
group scores the rule ranks groups by (``functional.group_topk(group_bias_G=...)``), never to
the gating weights; after each iteration b_g += rate * sign(mean load - load_g), the sign rule
of Megatron's ``get_updated_expert_bias``, with load_g the (token, expert) pairs routed into g.

Pure torch, no collectives, no host syncs. Shape suffixes: ``megatron_c2r/routing/__init__.py``
(G stands for whichever groups are balanced: EP-rank groups, or nodes).
"""

from __future__ import annotations

from typing import Tuple

import torch


def group_mass_TG(p_TE: torch.Tensor, expert_to_group_E: torch.Tensor, num_groups: int) -> torch.Tensor:
    """fp32 [T, G]: each token's probability mass per group (differentiable in ``p_TE``)."""
    return p_TE.new_zeros(p_TE.shape[0], num_groups).index_add_(1, expert_to_group_E, p_TE)


@torch.no_grad()
def group_loads(routing_map_TE: torch.Tensor, groups_GN: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pairs_G, tokens_G), fp32 [G] each: (token, expert) pairs routed into each group (the
    experts' work there) and tokens with at least one expert there (the rows a one-row-per-
    destination dispatcher sends it). ``routing_map_TE`` bool [T, E], padding already masked."""
    num_tokens = routing_map_TE.shape[0]
    map_TGN = routing_map_TE.index_select(1, groups_GN.flatten()).view(num_tokens, *groups_GN.shape)
    pairs_G = map_TGN.sum(dim=(0, 2)).float()
    tokens_G = map_TGN.any(dim=2).sum(dim=0).float()
    return pairs_G, tokens_G


def group_balance_loss(
    group_mass_TG: torch.Tensor,
    counts_G: torch.Tensor,
    total_tokens,
    per_token: int,
) -> torch.Tensor:
    """0-d fp32: sum_g (G / (per_token * T)) counts_g * (1/T) sum_t mass_tg, T = ``total_tokens``.

    ``counts_G`` are (token, expert) pairs with ``per_token`` = K (device level) or tokens sent
    with ``per_token`` = M (communication level), summed over the ranks sharing the tokens;
    ``group_mass_TG`` is this rank's (``group_mass_TG``, padding rows zeroed). Without the
    coefficient; gradients flow through the mass only."""
    num_groups = group_mass_TG.shape[1]
    total = torch.as_tensor(total_tokens, dtype=torch.float32, device=group_mass_TG.device).clamp(min=1.0)
    scale = num_groups / (per_token * total * total)
    return (group_mass_TG.sum(dim=0) * counts_G.detach()).sum() * scale


@torch.no_grad()
def updated_group_bias(load_G: torch.Tensor, bias_G: torch.Tensor, rate: float) -> torch.Tensor:
    """fp32 [G]: ``bias_G + rate * sign(mean(load_G) - load_G)`` (Megatron's expert-bias sign
    rule, here per group; ``load_G`` already summed over the ranks that route)."""
    load_G = load_G.float()
    return bias_G + torch.sign(load_G.mean() - load_G) * rate
