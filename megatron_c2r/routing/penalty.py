"""The collaboration penalty: a differentiable loss that pulls each token's router probability
mass into the expert set its top-1 expert anchors.

Formula (per token t, with p_t = the router's full score distribution over all E experts,
softmax for ``softmax`` routers and sum-normalised sigmoid for ``sigmoid`` routers, in fp32):

    a_t          = argmax_e p_t[e]                  (the anchor; no gradient flows through it)
    A(a_t)       = the anchor's allowed set, owned by the routing rule (``routing.rules``):
                   group rules and top-k -> the anchor's group,  c2r -> {a_t} U top_t(a_t)
    penalty_t    = 1 - sum_{e in A(a_t)} p_t[e]     (the mass outside the allowed set, in [0, 1])
    penalty      = coeff * mean over non-padding tokens of penalty_t

Why this form: its gradient w.r.t. the logits moves mass from experts outside the anchored set to
experts inside it, which is exactly what makes the hard constraint cheap (the unconstrained top-k
then already sits inside the set, so constraining changes little). Anchoring on the top-1 expert,
rather than on the best-scoring group, keeps the penalty's set equal to the set the anchored rule
routes into. Keep the coefficient small (1e-3..1e-2) or anneal it: the measured effect of each
coefficient is in ``docs/quality.md`` (the ``_penalty`` rows).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_c2r.routing.functional import expert_scores


def full_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """[T, E] fp32 distribution over all experts used by the penalty and the aux losses
    (softmax, or sigmoid normalised to sum 1: Megatron's scores for its aux losses)."""
    s_TE = expert_scores(logits_TE, score_function, keep_fp32=True)
    if score_function == "sigmoid":  # sigmoid scores do not sum to 1 by themselves
        return s_TE / (s_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return s_TE


def mass_in_group(
    p_TE: torch.Tensor, anchor_T: torch.Tensor, expert_to_group_E: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """fp32 [T]: the mass of ``p_TE`` inside each anchor's group."""
    mass_TG = p_TE.new_zeros(p_TE.shape[0], num_groups).index_add_(1, expert_to_group_E, p_TE)
    anchor_group_T1 = expert_to_group_E.index_select(0, anchor_T).unsqueeze(1)
    return mass_TG.gather(1, anchor_group_T1).squeeze(1)


def mass_in_top_t(
    p_TE: torch.Tensor, anchor_T: torch.Tensor, top_t_lists_EL: torch.Tensor
) -> torch.Tensor:
    """fp32 [T]: the mass of ``p_TE`` on {anchor} U top_t(anchor)."""
    cand_TL = top_t_lists_EL.index_select(0, anchor_T)
    return p_TE.gather(1, anchor_T.unsqueeze(1)).squeeze(1) + p_TE.gather(1, cand_TL).sum(dim=1)


def collaboration_penalty(
    logits_TE: torch.Tensor,
    inside_mass_T: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    score_function: str = "softmax",
    padding_mask_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over valid tokens of the probability mass outside the anchor's allowed set (see the
    module docstring). Returns a 0-d fp32 tensor (without the coefficient); no host sync.

    Args:
        logits_TE: router logits [T, E], any float dtype.
        inside_mass_T: ``(p_TE fp32 [T, E], anchor_T int64 [T]) -> fp32 [T]``, the mass inside
            the allowed set (``mass_in_group`` / ``mass_in_top_t`` bound to their tables, or a
            routing rule's ``inside_mass_T``).
        padding_mask_T: bool [T], True marks padding (Megatron's convention); excluded.
    """
    p_TE = full_scores(logits_TE, score_function)
    anchor_T = p_TE.detach().argmax(dim=-1)
    outside_T = 1.0 - inside_mass_T(p_TE, anchor_T)
    if padding_mask_T is not None:
        valid_T = (~padding_mask_T).to(outside_T.dtype)
        return (outside_T * valid_T).sum() / valid_T.sum().clamp(min=1.0)
    return outside_T.mean()
