"""Constrained top-k selection: the C2R rule and the group-aligned rule.

Both functions take the same ``scores_TE`` tensor Megatron's ``topk_routing_with_score_function``
hands to its top-k step (logits for softmax without pre-softmax, softmax scores with pre-softmax,
sigmoid scores plus expert bias for sigmoid), and return ``(values_TK, indices_TK)`` like
``torch.topk``. ``probs_from_selection`` then turns a selection into Megatron's ``probs``
exactly the way Megatron does, so the constrained router differs from ``TopKRouter`` only in
*which* experts are chosen.

Shape suffixes: the legend in ``megatron_c2r/routing/__init__.py`` (here also R = K-1 experts
after the top-1, M = groups kept per token, C = M*N candidate columns).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_c2r.parallel import experts_per_rank  # E / G: groups split like EP ranks


# ------------------------------------------------------------------------------------------------
# Validation (one-line errors naming field, value and fix; called at construction time)
# ------------------------------------------------------------------------------------------------
def validate_top_t_lists(top_t_lists_EL: torch.Tensor, num_experts: int, topk: int) -> None:
    """Check an [E, L] table of collaborator ids: right shape, ids in range, no self entries, no
    duplicates in a row, k-1 <= L <= E-1."""
    if top_t_lists_EL.dim() != 2 or top_t_lists_EL.shape[0] != num_experts:
        raise ValueError(
            f"top_t_lists has shape {tuple(top_t_lists_EL.shape)}, expected [num_experts="
            f"{num_experts}, top_t]: give one list of top_t collaborator ids per expert"
        )
    t = top_t_lists_EL.shape[1]
    if t < topk - 1 or t > num_experts - 1:
        raise ValueError(
            f"top_t={t} must satisfy topk-1={topk - 1} <= top_t <= num_experts-1={num_experts - 1}"
        )
    if top_t_lists_EL.dtype.is_floating_point:
        raise ValueError(f"top_t_lists has dtype {top_t_lists_EL.dtype}: expert ids must be ints")
    if t == 0:
        return
    lo, hi = int(top_t_lists_EL.min()), int(top_t_lists_EL.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"top_t_lists holds expert id {lo if lo < 0 else hi} outside [0, {num_experts - 1}]"
        )
    experts_E1 = torch.arange(num_experts, device=top_t_lists_EL.device).unsqueeze(1)
    self_rows = (top_t_lists_EL == experts_E1).any(dim=1).nonzero().flatten()
    if self_rows.numel():
        e = int(self_rows[0])
        raise ValueError(f"top_t_lists[{e}] contains expert {e} itself: lists hold other experts")
    sorted_EL = top_t_lists_EL.sort(dim=1).values
    dup_rows = (sorted_EL[:, 1:] == sorted_EL[:, :-1]).any(dim=1).nonzero().flatten()
    if dup_rows.numel():
        e = int(dup_rows[0])
        raise ValueError(
            f"top_t_lists[{e}] = {top_t_lists_EL[e].tolist()} has duplicate ids: each collaborator "
            "may appear once"
        )


def validate_groups(
    expert_to_group_E: torch.Tensor, num_groups: int, topk: int, max_groups: int
) -> None:
    """Check an expert->group map: a balanced partition into ``num_groups`` groups of E/G experts,
    1 <= max_groups <= G, and k <= max_groups * E/G (enough experts under the constraint)."""
    per_group = experts_per_rank(
        expert_to_group_E.numel(), num_groups, experts_name="num_experts", ep_name="num_groups"
    )
    if not 1 <= max_groups <= num_groups:
        raise ValueError(f"max_groups={max_groups} must be in [1, num_groups={num_groups}]")
    if topk > max_groups * per_group:
        raise ValueError(
            f"topk={topk} exceeds the {max_groups} group(s) x {per_group} experts available "
            f"under the constraint: raise max_groups or lower topk"
        )
    if expert_to_group_E.dtype.is_floating_point:
        raise ValueError(f"expert_to_group has dtype {expert_to_group_E.dtype}: group ids are ints")
    counts_G = torch.bincount(expert_to_group_E.long().clamp(min=0), minlength=num_groups)
    bad = int(expert_to_group_E.min()) < 0 or int(expert_to_group_E.max()) >= num_groups
    if bad or counts_G.numel() != num_groups or bool((counts_G != per_group).any()):
        raise ValueError(
            f"expert_to_group={expert_to_group_E.tolist()} is not a balanced partition into "
            f"{num_groups} groups of {per_group}: each group id in [0, {num_groups - 1}] must "
            f"appear exactly {per_group} times"
        )


def contiguous_groups(num_experts: int, num_groups: int) -> torch.Tensor:
    """int64 [E]: the default partition, contiguous blocks of E/G ids (= the EP ranks' expert
    sets when G is the EP size, after any placement relabelling)."""
    per_group = experts_per_rank(num_experts, num_groups, experts_name="num_experts",
                                 ep_name="num_groups")
    return torch.arange(num_experts, dtype=torch.int64) // per_group


def groups_from_expert_to_group(expert_to_group_E: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[E] group id per expert -> [G, N] expert ids per group (ascending)."""
    order_E = torch.sort(expert_to_group_E, stable=True).indices
    return order_E.view(num_groups, -1)


def groups_per_token(
    routing_map_TE: torch.Tensor,
    expert_to_group_E: torch.Tensor,
    num_groups: int,
    *,
    groups_GN: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int64 [T]: distinct groups holding each token's routed experts. With the default groups
    (contiguous blocks of E/P experts = the EP ranks) this is the rows per token a
    one-row-per-destination dispatcher ships. No host sync; [T, E] bool intermediates only.

    Args:
        routing_map_TE: bool [T, E].
        expert_to_group_E: int64 [E], a balanced partition into ``num_groups`` groups.
        groups_GN: optional cached ``groups_from_expert_to_group(expert_to_group_E, num_groups)``;
            ``routing_map_TE`` is then read through it (pass ``None`` only for cold paths).
    """
    if groups_GN is None:
        groups_GN = groups_from_expert_to_group(expert_to_group_E, num_groups)
    num_tokens = routing_map_TE.shape[0]
    map_TGN = routing_map_TE.index_select(1, groups_GN.flatten()).view(num_tokens, *groups_GN.shape)
    return map_TGN.any(dim=2).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# Selection rules
# ------------------------------------------------------------------------------------------------
def c2r_topk(
    scores_TE: torch.Tensor, topk: int, top_t_lists_EL: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The C2R rule: top-1 free, the other k-1 experts from the top-1 expert's top-T list.

    Only the L = T candidate columns are ranked (one gather + a top-(k-1) over L), so this costs
    less than a plain top-k over all E experts.

    Args:
        scores_TE: selection scores (higher is better), any float dtype.
        topk: k.
        top_t_lists_EL: int64 [E, L]; row e = the collaborators of e (validated, no self entry).
    Returns:
        (values_TK, indices_TK) like torch.topk (descending); column 0 is the top-1 expert.
    """
    top1_values_T1, top1_T1 = scores_TE.max(dim=-1, keepdim=True)
    cand_TL = top_t_lists_EL.index_select(0, top1_T1.squeeze(1))
    rest_values_TR, rest_pos_TR = scores_TE.gather(1, cand_TL).topk(topk - 1, dim=-1)
    indices_TK = torch.cat([top1_T1, cand_TL.gather(1, rest_pos_TR)], dim=1)
    values_TK = torch.cat([top1_values_T1, rest_values_TR], dim=1)
    return values_TK, indices_TK


def allowed_from_top_t(top_t_lists_EL: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, L] top-T lists -> bool [E, E] allowed sets {e} U top_t(e)."""
    allowed_EE = torch.eye(num_experts, dtype=torch.bool, device=top_t_lists_EL.device)
    allowed_EE.scatter_(1, top_t_lists_EL.long(), True)
    return allowed_EE


def group_topk(
    scores_TE: torch.Tensor,
    topk: int,
    expert_to_group_E: torch.Tensor,
    num_groups: int,
    max_groups: int,
    anchored: bool = True,
    groups_GN: Optional[torch.Tensor] = None,
    group_bias_G: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard group-aligned routing: each token uses at most ``max_groups`` groups (M).

    Group score = sum of the top-(k // M) scores inside the group (Megatron's group-limited
    score, but over an arbitrary balanced partition, e.g. a collaboration-aware placement).
    ``anchored=True`` (the flagship rule): the top-1 expert's group is always kept and the best
    M-1 *other* groups by group score are added. ``anchored=False``: the best M groups by group
    score (Megatron's rule). The k experts are then the top-k inside the kept groups.

    Only the kept groups' M*N candidate columns are ranked; anchored M=1 needs no group scores at
    all (argmax -> its group -> top-k over N columns), which is cheaper than plain top-k.

    Args:
        groups_GN: [G, N] expert ids per group (``groups_from_expert_to_group``); pass it to avoid
            recomputing it every call.
        group_bias_G: optional fp32 [G] offsets on the group choice only (aux-loss-free group
            balance): added to every group score, and the anchor becomes the group with the best
            (best expert score + offset); expert choice inside the kept groups stays unbiased.
            None -> exactly the unbiased rule.
    Returns (values_TK, indices_TK) like torch.topk (descending).
    """
    num_tokens, num_experts = scores_TE.shape
    if groups_GN is None:
        groups_GN = groups_from_expert_to_group(expert_to_group_E, num_groups)
    per_group = groups_GN.shape[1]
    if group_bias_G is None and anchored and max_groups == 1:
        kept_TM = expert_to_group_E.index_select(0, scores_TE.argmax(dim=-1)).unsqueeze(1)
    else:
        scores_TGN = scores_TE.index_select(1, groups_GN.flatten()).view(num_tokens, num_groups, per_group)
        anchor_T1 = None  # with a bias the anchor group is chosen from biased group maxima
        if anchored and group_bias_G is None:  # the top-1 expert's group
            anchor_T1 = expert_to_group_E.index_select(0, scores_TE.argmax(dim=-1)).unsqueeze(1)
        kept_TM = _keep_best_blocks(
            scores_TGN, topk, max_groups, anchored=anchored, bias_G=group_bias_G, anchor_T1=anchor_T1
        )
    cand_TC = groups_GN.index_select(0, kept_TM.flatten()).view(num_tokens, -1)  # C = M*N
    values_TK, pos_TK = scores_TE.gather(1, cand_TC).topk(topk, dim=-1)
    return values_TK, cand_TC.gather(1, pos_TK)


def _keep_best_blocks(
    scores_TGN: torch.Tensor,
    topk: int,
    keep: int,
    *,
    anchored: bool,
    bias_G: Optional[torch.Tensor] = None,
    anchor_T1: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int64 [T, keep]: the blocks (groups, nodes, ranks of a node: dim 1 of ``scores_TGN``)
    each token keeps. Block score = sum of its top-(k // keep) scores (at least 1, at most the
    block) plus ``bias_G``. ``anchored``: the anchor block is always kept (``anchor_T1``, else
    the block with the best (best score + bias)), then the best ``keep - 1`` others."""
    if anchored and anchor_T1 is None:
        best_TG = scores_TGN.amax(dim=-1)
        anchor_T1 = (best_TG if bias_G is None else best_TG + bias_G).argmax(dim=-1, keepdim=True)
    if anchored and keep == 1:
        return anchor_T1
    take = max(1, min(scores_TGN.shape[-1], topk // keep))
    block_scores_TG = scores_TGN.topk(take, dim=-1).values.sum(dim=-1)
    if bias_G is not None:
        block_scores_TG = block_scores_TG + bias_G
    if anchored:
        block_scores_TG = block_scores_TG.scatter(1, anchor_T1, float("inf"))
    return block_scores_TG.topk(keep, dim=-1).indices


def node_topk(
    scores_TE: torch.Tensor,
    topk: int,
    groups_GN: torch.Tensor,
    num_nodes: int,
    max_nodes: int,
    *,
    anchored: bool = True,
    max_ranks_per_node: Optional[int] = None,
    node_bias_D: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Node-limited routing: each token uses at most ``max_nodes`` nodes (M), optionally at most
    ``max_ranks_per_node`` groups (Q, EP ranks) inside each kept node.

    Nodes are contiguous blocks of P = G / D groups (``groups_GN`` rows g*P .. g*P+P-1 form node
    g), so X = P*N experts each. Node score = sum of the top-(k // M) scores of its experts
    (Megatron's group-limited score with groups = nodes, DeepSeek-V3's node-limited rule).
    ``anchored``: the top-1 expert's node plus the best M-1 other nodes; else the best M nodes
    (``group_limited_topk`` with num_groups = nodes, equal to it). With Q set, each kept node
    keeps the rank of its own best expert plus its best Q-1 other ranks by rank score (sum of the
    top-(k // (M*Q)) scores): the anchored group rule nested in every node. Then plain top-k
    over the kept candidates (C = M*X, or M*Q*N columns).

    Args:
        scores_TE: selection scores (higher is better).
        groups_GN: int64 [G, N] expert ids per group; G must be a multiple of ``num_nodes``.
        node_bias_D: optional fp32 [D] offsets on the node choice (as ``group_bias_G`` in
            ``group_topk``); None -> the unbiased rule.
    Returns (values_TK, indices_TK) like torch.topk (descending).
    """
    num_tokens = scores_TE.shape[0]
    num_groups, per_group = groups_GN.shape
    ranks_per_node = num_groups // num_nodes
    nodes_DX = groups_GN.reshape(num_nodes, ranks_per_node * per_group)
    scores_TDX = scores_TE.index_select(1, nodes_DX.flatten()).view(num_tokens, num_nodes, -1)
    kept_TM = _keep_best_blocks(scores_TDX, topk, max_nodes, anchored=anchored, bias_G=node_bias_D)
    if max_ranks_per_node is None or max_ranks_per_node >= ranks_per_node:
        cand_TC = nodes_DX.index_select(0, kept_TM.flatten()).view(num_tokens, -1)  # C = M*X
    else:
        kept_nodes = kept_TM.shape[1]
        index_TMX = kept_TM.unsqueeze(-1).expand(-1, -1, nodes_DX.shape[1])
        scores_TMPN = scores_TDX.gather(1, index_TMX).view(
            num_tokens, kept_nodes, ranks_per_node, per_group
        )
        ranks_TMQ = _keep_best_blocks(  # each kept node's ranks, by index inside the node
            scores_TMPN.flatten(0, 1), topk // kept_nodes, max_ranks_per_node, anchored=True
        ).view(num_tokens, kept_nodes, -1)
        groups_TMQ = kept_TM.unsqueeze(-1) * ranks_per_node + ranks_TMQ
        cand_TC = groups_GN.index_select(0, groups_TMQ.flatten()).view(num_tokens, -1)  # C = M*Q*N
    values_TK, pos_TK = scores_TE.gather(1, cand_TC).topk(topk, dim=-1)
    return values_TK, cand_TC.gather(1, pos_TK)


# ------------------------------------------------------------------------------------------------
# Router logits
# ------------------------------------------------------------------------------------------------
class _GatingLinear(torch.autograd.Function):
    """logits = input @ weight.T (+ bias) computed in ``router_dtype``; gradients returned in the
    input's and weight's dtypes (the math of Megatron's non-TE ``router_gating_linear``)."""

    @staticmethod
    def forward(ctx, inp, weight, bias, router_dtype):
        ctx.save_for_backward(inp, weight, bias)
        ctx.router_dtype = router_dtype
        inp_2d = inp.reshape(-1, inp.shape[-1]).to(router_dtype)
        if bias is None:
            out = torch.mm(inp_2d, weight.to(router_dtype).t())
        else:
            out = torch.addmm(bias.to(router_dtype), inp_2d, weight.to(router_dtype).t())
        return out.view(*inp.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        inp, weight, bias = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        inp_2d = inp.reshape(-1, inp.shape[-1])
        grad_inp = torch.mm(grad_2d, weight.to(ctx.router_dtype)).to(inp.dtype).view_as(inp)
        grad_w = torch.mm(grad_2d.t(), inp_2d.to(ctx.router_dtype)).to(weight.dtype)
        grad_b = grad_2d.sum(dim=0).to(bias.dtype) if bias is not None else None
        return grad_inp, grad_w, grad_b, None


def gating_linear(
    inp_SBH: torch.Tensor,
    weight_EH: torch.Tensor,
    bias_E: Optional[torch.Tensor],
    router_dtype: torch.dtype,
) -> torch.Tensor:
    """Router logits [..., E] in ``router_dtype`` on any device (autograd-aware). It casts the
    [..., H] input to ``router_dtype``, so on CUDA Megatron's own gating (TE's bf16-in /
    fp32-out GEMM) is the better choice; ``C2RRouter.gating`` uses this one elsewhere."""
    return _GatingLinear.apply(inp_SBH, weight_EH, bias_E, router_dtype)


# ------------------------------------------------------------------------------------------------
# Score functions (the one place that branches on Megatron's ``moe_router_score_function``)
# ------------------------------------------------------------------------------------------------
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def expert_scores(logits: torch.Tensor, score_function: str, *, keep_fp32: bool = False) -> torch.Tensor:
    """Megatron's score function over the last dim, computed in fp32: softmax, or elementwise
    sigmoid (not normalised). Returned in ``logits``' dtype, as Megatron does for the scores it
    ranks and turns into probs, or kept fp32 (``keep_fp32=True``: the losses' distribution)."""
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        raise ValueError(
            f"moe_router_score_function={score_function!r} must be one of {', '.join(SCORE_FUNCTIONS)}"
        )
    return scores if keep_fp32 else scores.type_as(logits)


def selection_scores(
    logits_TE: torch.Tensor,
    *,
    score_function: str,
    use_pre_softmax: bool,
    expert_bias_E: Optional[torch.Tensor],
) -> torch.Tensor:
    """The tensor Megatron runs its top-k on (see the module docstring): logits for softmax
    without pre-softmax, softmax scores with it, sigmoid scores plus the expert bias."""
    if score_function == "softmax" and not use_pre_softmax:
        return logits_TE
    scores_TE = expert_scores(logits_TE, score_function)
    if score_function == "sigmoid" and expert_bias_E is not None:
        return scores_TE + expert_bias_E
    return scores_TE


# ------------------------------------------------------------------------------------------------
# Selection -> Megatron probs
# ------------------------------------------------------------------------------------------------
def probs_from_selection(
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    score_function: str,
    use_pre_softmax: bool,
    scaling_factor: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron's probs for a given expert selection, computed the way
    ``topk_routing_with_score_function`` computes them for its own selection:

        softmax, pre-softmax:  softmax over all E, gathered at the selection (no renormalising)
        softmax:               softmax over the k selected logits
        sigmoid:               sigmoid at the selection, renormalised over k when k > 1
    then times ``scaling_factor``. Returns dense (probs_TE, routing_map_TE).
    """
    topk = indices_TK.shape[1]
    if score_function == "softmax" and not use_pre_softmax:
        probs_TK = expert_scores(logits_TE.gather(1, indices_TK), score_function)
    else:
        probs_TK = expert_scores(logits_TE, score_function).gather(1, indices_TK)
        if score_function == "sigmoid" and topk > 1:
            probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        probs_TK = probs_TK * scaling_factor
    probs_TE = torch.zeros_like(logits_TE).scatter(1, indices_TK, probs_TK)
    routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, indices_TK, True)
    return probs_TE, routing_map_TE
