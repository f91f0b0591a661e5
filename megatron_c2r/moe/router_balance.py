"""The losses and biases ``C2RRouter`` adds around its selection, adapted to Megatron.

    attach_collaboration_penalty   c2r.penalty_coeff x the rule's penalty        -> "c2r_penalty"
    attach_group_balance_losses    DeepSeek-V2's device / communication balance  -> "device_balance_loss",
                                   losses over the rule's balance groups            "comm_balance_loss"
    update_group_biases            the group-bias sign-rule update of every router that has one,
                                   one all-reduce for all of them (``step_routers`` calls it)

Every loss goes through Megatron's aux-loss path (``attach_and_log_load_balancing_loss``: the
gradient rides ``MoEAuxLossAutoScaler`` on the probs, the value goes to Megatron's layer-wise
tracker), so they compose with Megatron's aux / seq / global aux losses and z-loss. Megatron-LM's
``training_log`` reports only the tracker names it lists itself (load_balancing_loss,
seq_/global_load_balancing_loss, z_loss), so ``c2r_penalty``, ``device_balance_loss`` and
``comm_balance_loss`` do not reach its log through the tracker: each value of the last forward
is also kept in ``router._last`` and reaches TensorBoard/W&B/CSV as ``moe/c2r/penalty``,
``moe/c2r/device_balance_loss`` and ``moe/c2r/comm_balance_loss`` through our metrics
(``metrics/report.py``, reported by the entry's hooks; averaged over DP, summed over PP). The math is pure (``routing.penalty``, ``routing.balance``).
No host syncs; collectives only where a docstring says so. Shape suffixes: the legend of
``megatron_c2r/routing/__init__.py``, plus V: a packed vector of counts (one collective).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_c2r.routing.balance import group_balance_loss, group_loads, group_mass_TG
from megatron_c2r.routing.penalty import full_scores
from megatron_c2r.routing.rules.soft import updated_locality_bias


def all_reduce_sum_(tensor: torch.Tensor, group) -> None:
    """In-place sum over ``group`` (collective); nothing without a multi-rank process group."""
    if dist.is_available() and dist.is_initialized() and group is not None and group.size() > 1:
        dist.all_reduce(tensor, group=group)


def attach_collaboration_penalty(
    router, probs_TE: torch.Tensor, logits_TE: torch.Tensor, padding_T: Optional[torch.Tensor]
) -> torch.Tensor:
    """``probs_TE`` with ``c2r.penalty_coeff`` x the rule's penalty attached (logged as
    ``c2r_penalty`` over TP x CP; the value of the last forward also in ``router._last``)."""
    coeff = router.c2r_config.penalty_coeff
    if coeff == 0 or not router.rule.penalty_applies(router._active):
        return probs_TE
    penalty = router.rule.penalty(
        logits_TE, router._routing_tables(), score_function=router.score_function,
        padding_mask_T=padding_T,
    )
    router._last["penalty"] = penalty.detach()
    valid = None if padding_T is None else (~padding_T).sum()
    return router.attach_and_log_load_balancing_loss(
        probs_TE, coeff, coeff * penalty, "c2r_penalty", router.tp_cp_group, valid_token_count=valid
    )


def attach_group_balance_losses(
    router,
    probs_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    padding_T: Optional[torch.Tensor],
) -> torch.Tensor:
    """``probs_TE`` with ``c2r.device_balance_coeff`` x L_dev and ``c2r.comm_balance_coeff`` x
    L_comm attached (``routing.balance``), over the rule's balance groups (``rule.balance``:
    EP-rank groups, or nodes in node mode).

    Counts come from ``routing_map_TE``, the map the experts get (constrained, after capacity
    dropping), padding excluded; they and the token count are summed over TP x CP in one
    all-reduce (collective, only when a coefficient is non-zero), as Megatron sums its aux-loss
    counts; the mass is this rank's. ``logits_TE`` [T, E], ``padding_T`` bool [T] or None."""
    cfg = router.c2r_config
    device_coeff, comm_coeff = cfg.device_balance_coeff, cfg.comm_balance_coeff
    if device_coeff == 0 and comm_coeff == 0:
        return probs_TE
    expert_to_group_E, groups_GN = router.rule.balance(router._routing_tables())
    p_TE = full_scores(logits_TE, router.score_function)
    map_TE = routing_map_TE
    if padding_T is None:
        local_tokens = logits_TE.shape[0]
        valid_1 = torch.full((1,), float(local_tokens), device=logits_TE.device)
    else:
        valid_T1 = (~padding_T).unsqueeze(-1)
        p_TE, map_TE = p_TE * valid_T1, map_TE & valid_T1
        local_tokens = valid_T1.sum()
        valid_1 = local_tokens.float().view(1)
    num_groups = groups_GN.shape[0]
    counts_V = torch.cat([*group_loads(map_TE, groups_GN), valid_1])  # [pairs_G, tokens_G, T]
    all_reduce_sum_(counts_V, router.tp_cp_group)
    mass_TG = group_mass_TG(p_TE, expert_to_group_E, num_groups)
    for name, coeff, counts_G, per_token in (
        ("device_balance_loss", device_coeff, counts_V[:num_groups], router.topk),
        ("comm_balance_loss", comm_coeff, counts_V[num_groups:-1], router.rule.balance_limit),
    ):
        if coeff == 0:
            continue
        loss = group_balance_loss(mass_TG, counts_G, counts_V[-1], per_token)
        router._last[name] = loss.detach()  # -> moe/c2r/<name> (metrics/report.py)
        probs_TE = router.attach_and_log_load_balancing_loss(
            probs_TE, coeff, coeff * loss, name, router.tp_cp_group, valid_token_count=local_tokens
        )
    return probs_TE


@torch.no_grad()
def update_group_biases(routers: Sequence) -> None:
    """``router.update_group_bias_`` for every router with a group bias (``c2r.group_bias_rate``
    > 0) and the locality-bias update of every router with a soft locality rule
    (``c2r.locality_bias_target``), their counts summed over TP x DP x CP (Megatron's
    expert-bias group) in ONE all-reduce. Collective: every rank of the stage calls it together
    (``step_routers`` does, once per iteration); with no such router it exchanges nothing."""
    grouped = [r for r in routers if getattr(r, "group_bias", None) is not None]
    soft = [r for r in routers if getattr(r, "locality_bias", None) is not None]
    if not grouped and not soft:
        return
    counts = [r.local_tokens_per_group for r in grouped] + [r.local_locality_counts for r in soft]
    counts_V = torch.cat(counts)
    all_reduce_sum_(counts_V, (grouped or soft)[0].tp_dp_cp_group)
    parts = counts_V.split([c.numel() for c in counts])
    for router, load_G in zip(grouped, parts):
        router.update_group_bias_(load_G)
    for router, counts_2 in zip(soft, parts[len(grouped):]):
        update_locality_bias_(router, counts_2)


@torch.no_grad()
def update_locality_bias_(router, counts_2: torch.Tensor) -> None:
    """Move ``router.locality_bias`` by +-``c2r.locality_bias_rate`` toward the target mean
    blocks per token from ``counts_2`` = (sum of blocks per token, tokens) summed over the ranks
    that route, then zero the router's counts (``routing.rules.soft.updated_locality_bias``)."""
    cfg = router.c2r_config
    router.locality_bias.copy_(
        updated_locality_bias(router.locality_bias, counts_2, cfg.locality_bias_target, cfg.locality_bias_rate)
    )
    router.local_locality_counts.zero_()
