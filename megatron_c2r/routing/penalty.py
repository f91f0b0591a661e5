"""The collaboration penalty: a differentiable loss that pulls each token's router probability
mass into the expert set its top-1 expert anchors.

Formula (per token t, with p_t = the router's full score distribution over all E experts,
softmax for ``softmax`` routers and sum-normalised sigmoid for ``sigmoid`` routers, in fp32):

    a_t          = argmax_e p_t[e]                  (the anchor; no gradient flows through it)
    A(a_t)       = the anchor's allowed set:        group mode -> the anchor's group,
                                                    c2r mode   -> {a_t} U top_t(a_t)
    penalty_t    = 1 - sum_{e in A(a_t)} p_t[e]     (the mass outside the allowed set, in [0, 1])
    penalty      = coeff * mean over non-padding tokens of penalty_t

Why this form: its gradient w.r.t. the logits moves mass from experts outside the anchored set to
experts inside it, which is exactly what makes the hard constraint cheap (the unconstrained top-k
then already sits inside the set, so constraining changes little). Anchoring on the top-1 expert,
rather than on the best-scoring group, follows REFERENCE.md section 9: "best group mass" at 0.05
cost +3.5% loss; the anchored set agrees with the routing rule the model is trained under. Keep
the coefficient small (1e-3..1e-2) or anneal it.
"""

from __future__ import annotations

from typing import Optional

import torch


def full_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """[T, E] fp32 distribution over all experts used by the penalty and the aux losses."""
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    if score_function == "sigmoid":
        s_TE = torch.sigmoid(logits_TE.float())
        return s_TE / (s_TE.sum(dim=-1, keepdim=True) + 1e-20)
    raise ValueError(f"score_function={score_function!r} must be 'softmax' or 'sigmoid'")


def collaboration_penalty(
    logits_TE: torch.Tensor,
    *,
    expert_to_group_E: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    top_t_lists_EL: Optional[torch.Tensor] = None,
    score_function: str = "softmax",
    padding_mask_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over valid tokens of the probability mass outside the anchor's allowed set (see the
    module docstring). Returns a 0-d fp32 tensor (without the coefficient).

    Give either ``top_t_lists_EL`` (c2r: allowed = {anchor} U top_t(anchor)) or
    ``expert_to_group_E`` + ``num_groups`` (group: allowed = the anchor's group).
    ``padding_mask_T``: bool, True marks padding (Megatron's convention); excluded.
    """
    p_TE = full_scores(logits_TE, score_function)
    anchor_T1 = p_TE.detach().argmax(dim=-1, keepdim=True)
    if top_t_lists_EL is not None:
        cand_TL = top_t_lists_EL.index_select(0, anchor_T1.squeeze(1))
        inside_T = p_TE.gather(1, anchor_T1).squeeze(1) + p_TE.gather(1, cand_TL).sum(dim=1)
    elif expert_to_group_E is not None and num_groups is not None:
        mass_TG = p_TE.new_zeros(p_TE.shape[0], num_groups).index_add_(1, expert_to_group_E, p_TE)
        inside_T = mass_TG.gather(1, expert_to_group_E.index_select(0, anchor_T1.squeeze(1)).unsqueeze(1)).squeeze(1)
    else:
        raise ValueError("collaboration_penalty needs top_t_lists_EL or expert_to_group_E + num_groups")
    outside_T = 1.0 - inside_T
    if padding_mask_T is not None:
        valid_T = (~padding_mask_T).to(outside_T.dtype)
        return (outside_T * valid_T).sum() / valid_T.sum().clamp(min=1.0)
    return outside_T.mean()


def group_allowed(expert_to_group_E: torch.Tensor) -> torch.Tensor:
    """bool [E, E]: row e = experts in e's group."""
    return expert_to_group_E.unsqueeze(0) == expert_to_group_E.unsqueeze(1)
