"""MoGE group-balanced selection (Pangu Pro MoE, "Mixture of Grouped Experts"), pure torch.

Experts are split into G balanced groups (by default one per EP rank) and every token takes
exactly k/G experts from *each* group: its best k/G by selection score inside every group. Every
group, hence every device, then receives exactly T * k/G (token, expert) pairs per micro-batch by
construction: the balance end of the locality/balance trade-off, at the price of every token
visiting every group (G destination ranks per token, the most the dedup dispatcher can ship).

Used by ``routing.rules.GroupBalancedRule`` (``c2r.mode: group_balanced``); the check that G
divides k is ``routing.config.check_group_balanced``. Shape suffixes: the legend in
``megatron_c2r/routing/__init__.py`` (T tokens, E experts, K top-k, G groups, N experts per
group, U = K // G experts per token in each group).
"""

from __future__ import annotations

from typing import Tuple

import torch


def group_balanced_topk(
    scores_TE: torch.Tensor, topk: int, groups_GN: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``topk // G`` experts per group per token: the best ones by ``scores_TE``.

    Args:
        scores_TE: float [T, E], the tensor Megatron runs its top-k on (higher is better).
        topk: K, a multiple of G (checked by the caller's config).
        groups_GN: int64 [G, N], expert ids per group (any balanced partition).
    Returns:
        ``(values_TK, indices_TK)`` like ``torch.topk``, ordered group by group (group g's U
        experts by descending score, then group g+1's). No host sync; O(T x E) work.
    """
    num_tokens = scores_TE.shape[0]
    num_groups, per_group = groups_GN.shape
    take = topk // num_groups
    candidates_TGN = scores_TE.index_select(1, groups_GN.flatten()).view(num_tokens, num_groups, per_group)
    values_TGU, local_TGU = candidates_TGN.topk(take, dim=2)
    # Column in the flattened [G * N] candidate order -> global expert id.
    offset_G1 = torch.arange(num_groups, device=scores_TE.device).mul_(per_group).unsqueeze(1)
    indices_TK = groups_GN.flatten()[(local_TGU + offset_G1).view(num_tokens, topk)]
    return values_TGU.reshape(num_tokens, topk), indices_TK


def experts_per_group_TG(routing_map_TE: torch.Tensor, groups_GN: torch.Tensor) -> torch.Tensor:
    """int64 [T, G]: how many of each token's routed experts sit in each group."""
    num_tokens = routing_map_TE.shape[0]
    num_groups = groups_GN.shape[0]
    selected_TGN = routing_map_TE.index_select(1, groups_GN.flatten()).view(num_tokens, num_groups, -1)
    return selected_TGN.sum(dim=2)
