"""MoGE group-balanced routing (``c2r.mode: group_balanced``): the pure selection against a
brute-force per-group top-k on many random partitions, and the real ``C2RRouter`` with Megatron's
score functions, aux losses, z-loss, expert bias, capacity dropping and the group balance losses
(world of one)."""

from __future__ import annotations

import pytest
import torch

from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.routing.functional import (
    groups_from_expert_to_group,
    probs_from_selection,
    selection_scores,
)
from megatron_c2r.routing.moge import experts_per_group_TG, group_balanced_topk
from megatron_c2r.routing.rules import GroupBalancedRule, build_rule
from tests.megatron_cpu import moe_config

E, K, H = 16, 4, 32


def random_partition(num_experts, num_groups, gen):
    return torch.randperm(num_experts, generator=gen) % num_groups


def brute_force(scores_TE, topk, expert_to_group_E, num_groups):
    """Per token and group: the k/G best experts of that group, as a set per token."""
    take = topk // num_groups
    out = []
    for t in range(scores_TE.shape[0]):
        chosen = set()
        for g in range(num_groups):
            members = (expert_to_group_E == g).nonzero().flatten()
            best = scores_TE[t, members].topk(take).indices
            chosen |= set(members[best].tolist())
        out.append(chosen)
    return out


@pytest.mark.parametrize("num_experts,topk,groups", [(8, 2, 2), (16, 4, 4), (16, 4, 2), (64, 8, 8),
                                                     (60, 6, 3), (16, 8, 4)])  # fmt: skip
def test_every_token_takes_exactly_k_over_g_experts_of_every_group_the_best_ones(
    num_experts, topk, groups
):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        e2g = random_partition(num_experts, groups, gen)
        scores = torch.randn(50, num_experts, generator=gen)
        values, idx = group_balanced_topk(scores, topk, groups_from_expert_to_group(e2g, groups))
        assert idx.shape == (50, topk) and idx.dtype == torch.int64
        assert torch.equal(values, scores.gather(1, idx))
        routing_map = torch.zeros(50, num_experts, dtype=torch.bool).scatter_(1, idx, True)
        assert torch.all(routing_map.sum(dim=1) == topk)  # k distinct experts
        per_group = torch.stack([routing_map[:, e2g == g].sum(dim=1) for g in range(groups)], 1)
        assert torch.all(per_group == topk // groups)
        assert torch.equal(experts_per_group_TG(routing_map, groups_from_expert_to_group(e2g, groups)),
                           per_group)  # fmt: skip
        expected = brute_force(scores, topk, e2g, groups)
        assert [set(row.tolist()) for row in idx] == expected


@pytest.mark.parametrize("score_function,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_probs_are_zero_off_the_map_and_positive_on_its_k_entries(score_function, pre):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(128, E, generator=gen)
    groups_GN = groups_from_expert_to_group(random_partition(E, 4, gen), 4)
    scores = selection_scores(logits, score_function=score_function, use_pre_softmax=pre,
                              expert_bias_E=None)  # fmt: skip
    _, idx = group_balanced_topk(scores, K, groups_GN)
    probs, routing_map = probs_from_selection(
        logits, idx, score_function=score_function, use_pre_softmax=pre, scaling_factor=None
    )
    assert torch.all(routing_map.sum(dim=1) == K)
    assert torch.all(probs[~routing_map] == 0) and torch.all(probs[routing_map] > 0)


def test_the_rule_flags_only_tokens_over_the_per_group_quota_and_has_no_penalty():
    gen = torch.Generator().manual_seed(2)
    e2g = random_partition(E, 4, gen)
    rule = build_rule("group_balanced", None, topk=K, num_groups=4, max_groups=1)
    assert isinstance(rule, GroupBalancedRule) and rule.constrained and not rule.needs_lists
    assert rule.group_limit == 4 and rule.balance_limit == 4 and not rule.penalty_applies(True)
    tables = rule.tables(e2g, torch.zeros(E, 0, dtype=torch.long))
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(200)])  # plain top-k-like
    routing_map = torch.zeros(200, E, dtype=torch.bool).scatter_(1, idx, True)
    want = torch.tensor([max(int((e2g[row] == g).sum()) for g in range(4)) > 1 for row in idx])
    got = rule.violated_T(None, routing_map, None, tables, True)
    assert want.any() and torch.equal(got, want)
    balanced = torch.zeros_like(routing_map).scatter_(1, rule.select(torch.randn(200, E), tables), True)
    assert not rule.violated_T(None, balanced, None, tables, True).any()


@pytest.mark.parametrize("topk,groups", [(4, 3), (4, 8), (6, 4)])
def test_g_not_dividing_k_is_a_one_line_error_from_the_config_and_the_rule(topk, groups):
    message = rf"moe_router_topk={topk} is not a multiple of c2r.num_groups={groups}"
    with pytest.raises(ValueError, match=message) as info:
        C2RRouterConfig(mode="group_balanced", num_groups=groups).resolve(
            num_experts=24, topk=topk, ep_size=1
        )
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message):
        build_rule("group_balanced", None, topk=topk, num_groups=groups, max_groups=1)


def test_options_without_meaning_under_the_rule_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"c2r.penalty_coeff=0.01 .* set c2r.penalty_coeff: 0"):
        C2RRouterConfig(mode="group_balanced", penalty_coeff=0.01)
    with pytest.raises(ValueError, match=r"c2r.group_bias_rate=0.001 biases the group choice"):
        C2RRouterConfig(mode="group_balanced", group_bias_rate=1e-3)


# ----------------------------------------------------------------------------------------------
# The real router
# ----------------------------------------------------------------------------------------------
FEATURES = {
    "softmax_aux_loss": dict(moe_aux_loss_coeff=1e-2),
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid_expert_bias_scaling": dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
    ),  # fmt: skip
    "seq_aux_and_z_loss": dict(moe_router_load_balancing_type="seq_aux_loss",
                               moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),  # fmt: skip
    "global_aux_loss": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2),
}


def moge_router(groups=4, e2g=None, **overrides):
    from megatron_c2r.moe.router import C2RRouter

    config = moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H, **overrides)
    cfg = C2RRouterConfig(mode="group_balanced", num_groups=groups,
                          expert_to_group=None if e2g is None else tuple(e2g.tolist()))  # fmt: skip
    router = C2RRouter(config, c2r_config=cfg)
    router.set_layer_number(1)
    return router.train()


@pytest.mark.usefixtures("megatron_world1")
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_router_selects_megatrons_probs_for_the_group_balanced_selection(feature, groups):
    overrides = FEATURES[feature]
    gen = torch.Generator().manual_seed(3)
    e2g = random_partition(E, groups, gen)
    router = moge_router(groups, e2g, **overrides)
    if router.enable_expert_bias:  # a large bias moves the selection, never the probs
        router.expert_bias.copy_(torch.randn(E, generator=gen))
    x = torch.randn(20, 2, H, generator=gen)
    probs, routing_map = router(x)
    logits = router.gating(x).view(-1, E).detach()
    scores = selection_scores(
        logits, score_function=router.score_function,
        use_pre_softmax=router.config.moe_router_pre_softmax,
        expert_bias_E=router.expert_bias if router.score_function == "sigmoid" else None,
    )  # fmt: skip
    _, idx = group_balanced_topk(scores, K, groups_from_expert_to_group(e2g, groups))
    want_probs, want_map = probs_from_selection(
        logits, idx, score_function=router.score_function,
        use_pre_softmax=router.config.moe_router_pre_softmax,
        scaling_factor=router.config.moe_router_topk_scaling_factor,
    )  # fmt: skip
    assert torch.equal(routing_map, want_map)
    torch.testing.assert_close(probs.detach(), want_probs, rtol=1e-6, atol=1e-7)
    assert torch.all(probs[~routing_map] == 0)
    probs.sum().backward()
    assert torch.isfinite(router.weight.grad).all()
    metrics = router.c2r_metrics()
    assert metrics["violation_rate"] == 0.0 and metrics["groups_per_token"] == groups
    assert metrics["group_load_max_over_mean"] == 1.0  # every group the same load, exactly
    if router.enable_expert_bias:  # Megatron's bias counts follow the constrained map
        assert torch.equal(router.local_tokens_per_expert, routing_map.sum(dim=0).to(
            router.local_tokens_per_expert.dtype))  # fmt: skip


@pytest.mark.usefixtures("megatron_world1")
def test_aux_loss_is_computed_on_the_group_balanced_map():
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        switch_load_balancing_loss_func,
    )

    coeff = 1e-2
    router = moge_router(4, moe_aux_loss_coeff=coeff)
    clear_aux_losses_tracker()
    x = torch.randn(40, 2, H)
    probs, routing_map = router(x)
    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    scores = torch.softmax(router.gating(x).view(-1, E), dim=-1)
    expected = switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=routing_map.sum(0), total_num_tokens=80, topk=K,
        num_experts=E, moe_aux_loss_coeff=coeff,
    ) / coeff  # fmt: skip
    torch.testing.assert_close(logged, expected.detach())
    clear_aux_losses_tracker()


@pytest.mark.usefixtures("megatron_world1")
def test_capacity_dropping_and_the_group_balance_losses_compose():
    router = moge_router(4, moe_expert_capacity_factor=0.5)
    probs, routing_map = router(torch.randn(24, 2, H))
    groups_GN = groups_from_expert_to_group(torch.arange(E) // 4, 4)
    assert torch.all(experts_per_group_TG(routing_map, groups_GN) <= 1)  # drops only remove
    assert routing_map.sum() < 48 * K
    from megatron_c2r.moe.router import C2RRouter

    config = moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H)
    cfg = C2RRouterConfig(mode="group_balanced", num_groups=4, device_balance_coeff=0.05,
                          comm_balance_coeff=0.02)  # fmt: skip
    balanced = C2RRouter(config, c2r_config=cfg)
    balanced.set_layer_number(1)
    probs, _ = balanced.train()(torch.randn(24, 2, H))
    probs.sum().mul(0).backward()  # only the attached losses reach the weight
    assert torch.isfinite(balanced.weight.grad).all()
