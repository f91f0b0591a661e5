"""Group-level balance (issue 15.2-15.4) on CPU: DeepSeek-V2's device / communication balance
losses against a brute-force autograd of the formula, the group bias (selection only, sign-rule
update, loads equalising), Megatron's expert bias under the constraint, and the tracker counting
plain top-k's preference (sampled) with no host sync in the router."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    get_updated_expert_bias,
)

from megatron_c2r.collaboration import coactivation_counts
from megatron_c2r.metrics.report import METRIC_NAMES
from megatron_c2r.moe.router import C2RRouter, step_routers
from megatron_c2r.routing.balance import updated_group_bias
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.routing.functional import (
    contiguous_groups,
    group_topk,
    groups_from_expert_to_group,
    node_topk,
    selection_scores,
)
from tests.megatron_cpu import moe_config
from tests.sync_audit import audit_router

pytestmark = pytest.mark.usefixtures("megatron_world1")

E, K, H = 16, 4, 32
# mode options -> (balance groups per expert, M of the communication loss)
MODES = {
    "group_m2": (dict(mode="group", num_groups=4, max_groups=2), torch.arange(E) // 4, 2),
    "node": (dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1), torch.arange(E) // 8, 1),
    "topk": (dict(mode="topk", num_groups=4), torch.arange(E) // 4, 4),
}


def _router(c2r, **megatron):
    router = C2RRouter(moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H, **megatron),
                       c2r_config=C2RRouterConfig(**c2r))
    router.set_layer_number(1)
    return router.train()


def _deepseek_losses(logits_TE, routing_map_TE, unit_E, m, padding_T=None):
    """DeepSeek-V2's L_DevBal and L_CommBal (without coefficients), written as in the paper."""
    valid_T = torch.ones(logits_TE.shape[0], dtype=torch.bool) if padding_T is None else ~padding_T
    s_TE = torch.softmax(logits_TE.float(), dim=-1) * valid_T.unsqueeze(1)
    map_TE = routing_map_TE & valid_T.unsqueeze(1)
    T, D = valid_T.sum(), int(unit_E.max()) + 1
    f_E = E / (K * T) * map_TE.sum(dim=0)
    P_E = s_TE.sum(dim=0) / T
    dev = comm = 0.0
    for d in range(D):
        in_d = unit_E == d
        P_d = P_E[in_d].sum()
        dev = dev + f_E[in_d].mean() * P_d
        comm = comm + D / (m * T) * map_TE[:, in_d].any(dim=1).sum() * P_d
    return dev, comm


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_device_and_comm_losses_are_deepseeks_formulas_logged_and_differentiated(mode, padded):
    c2r, unit_E, m = MODES[mode]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 2, H, generator=gen)
    mask = (torch.rand(24, 2, generator=gen) < 0.25) if padded else None
    padding_T = None if mask is None else mask.reshape(-1)
    for name, coeffs in [("device_balance_loss", (0.05, 0.0)), ("comm_balance_loss", (0.0, 0.02))]:
        router = _router(dict(c2r, device_balance_coeff=coeffs[0], comm_balance_coeff=coeffs[1]))
        torch.manual_seed(0)
        torch.nn.init.normal_(router.weight, std=0.5)
        clear_aux_losses_tracker()
        probs, routing_map = router(x, padding_mask=mask)
        probs.sum().mul(0).backward()  # only the attached losses reach the weight
        pick, coeff = (0, coeffs[0]) if coeffs[0] else (1, coeffs[1])
        want = _deepseek_losses(router.gating(x).view(-1, E), routing_map, unit_E, m, padding_T)[pick]
        tracker = get_moe_layer_wise_logging_tracker()
        torch.testing.assert_close(tracker[name]["values"][0], want.detach(), rtol=1e-5, atol=1e-7)
        # training_log drops tracker names it does not list: the value reaches moe/c2r/<name>
        torch.testing.assert_close(router._last[name], want.detach(), rtol=1e-5, atol=1e-7)
        assert name in METRIC_NAMES
        other = "comm_balance_loss" if pick == 0 else "device_balance_loss"
        assert other not in tracker or tracker[other]["values"].abs().sum() == 0
        # Brute-force autograd of coeff x the formula, the routing map held fixed.
        weight = router.weight.detach().clone().requires_grad_(True)
        brute = _deepseek_losses(x.view(-1, H) @ weight.t(), routing_map, unit_E, m, padding_T)[pick]
        (coeff * brute).backward()
        torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-4, atol=1e-8)
    clear_aux_losses_tracker()


def test_balance_loss_grads_are_nonzero_iff_a_coefficient_is_and_compose_with_megatrons_losses():
    x = torch.randn(32, 2, H, generator=torch.Generator().manual_seed(4))

    def weight_grad(c2r, **megatron):
        router = _router(dict(mode="group", num_groups=4, max_groups=2, **c2r), **megatron)
        torch.manual_seed(0)
        torch.nn.init.normal_(router.weight, std=0.5)
        probs, _ = router(x)
        probs.sum().mul(0).backward()
        return router.weight.grad.clone()

    assert weight_grad({}).abs().sum() == 0
    parts = [weight_grad(dict(device_balance_coeff=0.05)), weight_grad(dict(comm_balance_coeff=0.02)),
             weight_grad({}, moe_aux_loss_coeff=1e-2), weight_grad({}, moe_z_loss_coeff=1e-3)]
    assert all(p.abs().sum() > 0 for p in parts)
    together = weight_grad(dict(device_balance_coeff=0.05, comm_balance_coeff=0.02),
                           moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    torch.testing.assert_close(together, sum(parts), rtol=1e-5, atol=1e-9)
    clear_aux_losses_tracker()


# ---- group bias ------------------------------------------------------------------------------
def test_group_bias_update_is_megatrons_expert_bias_sign_rule():
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        load = torch.randint(0, 50, (8,), generator=gen).float()
        bias = torch.randn(8, generator=gen)
        expected = get_updated_expert_bias(load.clone(), bias, 1e-3)  # world of one: no reduction
        assert torch.equal(updated_group_bias(load, bias, 1e-3), expected)


def _skewed_logits(gen, tokens, num_experts, skew_E):
    return torch.randn(tokens, num_experts, generator=gen) + skew_E


@pytest.mark.parametrize("rule", ["group_m1", "group_m2", "node_m1_q1"])
def test_group_bias_equalises_group_loads_of_a_skewed_router_in_a_few_hundred_steps(rule):
    gen = torch.Generator().manual_seed(6)
    num_experts, groups = 32, 8
    e2g = torch.randperm(num_experts, generator=gen) % groups
    groups_GN = groups_from_expert_to_group(e2g, groups)
    units, unit_E = (4, e2g // 2) if rule.startswith("node") else (groups, e2g)
    skew_E = 0.6 * unit_E.float() / units  # later groups are preferred
    bias = torch.zeros(units)

    def loads(bias_U):
        scores = _skewed_logits(gen, 2048, num_experts, skew_E)
        if rule == "group_m1":
            idx = group_topk(scores, 4, e2g, groups, 1, groups_GN=groups_GN, group_bias_G=bias_U)[1]
        elif rule == "group_m2":
            idx = group_topk(scores, 4, e2g, groups, 2, groups_GN=groups_GN, group_bias_G=bias_U)[1]
        else:
            idx = node_topk(scores, 4, groups_GN, 4, 1, max_ranks_per_node=1, node_bias_D=bias_U)[1]
        return torch.bincount(unit_E[idx].flatten(), minlength=units).float()

    before = loads(None)
    for _ in range(300):
        bias = updated_group_bias(loads(bias), bias, 0.01)
    after = torch.stack([loads(bias) for _ in range(10)]).mean(dim=0)  # expected load, not noise
    assert before.max() / before.mean() > 1.4, before
    assert after.max() / after.mean() < 1.1, (before, after, bias)


def test_group_bias_moves_the_group_choice_only_and_step_routers_updates_it():
    router = _router(dict(mode="group", num_groups=4, group_bias_rate=0.1))
    assert router.group_bias.shape == (4,) and "group_bias" in router.state_dict()
    assert "group_bias" not in _router(dict(mode="group", num_groups=4)).state_dict()
    x = torch.randn(20, 2, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        router.group_bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))
    probs, routing_map = router(x)
    logits = router.gating(x).view(-1, E).detach()
    assert routing_map[:, 4:8].all() and not routing_map[:, :4].any() and not routing_map[:, 8:].any()
    expected = torch.softmax(logits[:, 4:8], dim=-1)  # gating weights: plain softmax, no bias
    torch.testing.assert_close(probs[:, 4:8], expected)
    assert torch.equal(router.local_tokens_per_group, torch.tensor([0.0, 40.0 * K, 0.0, 0.0]))
    step_routers(router, 0)  # group 1 is over its mean, the others under it
    torch.testing.assert_close(router.group_bias, torch.tensor([0.1, 99.9, 0.1, 0.1]))
    assert not router.local_tokens_per_group.any()


# ---- Megatron's expert bias under the constraint ---------------------------------------------
def test_expert_bias_selects_under_the_constraint_counts_the_constrained_map_and_stays_out_of_probs():
    router = _router(dict(mode="group", num_groups=4), moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True)
    with torch.no_grad():
        router.expert_bias[9] = 10.0
    x = torch.randn(20, 2, H, generator=torch.Generator().manual_seed(8))
    probs, routing_map = router(x)
    assert routing_map[:, 9].all() and not routing_map[:, :8].any() and not routing_map[:, 12:].any()
    assert torch.equal(router.local_tokens_per_expert, routing_map.sum(dim=0).float())
    s = torch.sigmoid(router.gating(x).view(-1, E).detach().float())
    expected = (s * routing_map) / (s * routing_map).sum(dim=1, keepdim=True)
    torch.testing.assert_close(probs, expected)


def test_megatrons_expert_bias_update_balances_experts_under_the_group_constraint():
    gen = torch.Generator().manual_seed(9)
    e2g = contiguous_groups(32, 8)
    skew_E = torch.linspace(0, 2.0, 32)[torch.randperm(32, generator=gen)]
    bias = torch.zeros(32)

    def loads(bias_E):
        logits = _skewed_logits(gen, 512, 32, skew_E)
        scores = selection_scores(logits, score_function="sigmoid", use_pre_softmax=False, expert_bias_E=bias_E)
        idx = group_topk(scores, 4, e2g, 8, 2)[1]
        return torch.bincount(idx.flatten(), minlength=32).float()

    before = loads(None)
    for _ in range(400):
        bias = get_updated_expert_bias(loads(bias), bias, 0.002)
    after = torch.stack([loads(bias) for _ in range(5)]).mean(dim=0)
    assert before.max() / before.mean() > 2.0, before
    assert after.max() / after.mean() < 1.25, after


# ---- the tracker sees preference -------------------------------------------------------------
def test_constrained_tracker_counts_plain_topks_preference_on_sampled_iterations():
    router = _router(dict(mode="group", num_groups=4, preference_sample_interval=2))
    assert bool(router.constraint_active)
    gen = torch.Generator().manual_seed(10)
    expected = torch.zeros(E, E, dtype=torch.int64)
    for iteration in range(4):
        x = torch.randn(16, 2, H, generator=gen)
        _, routing_map = router(x)
        plain = torch.zeros_like(routing_map).scatter_(1, router.gating(x).view(-1, E).topk(K, dim=1).indices, True)
        assert not torch.equal(plain, routing_map), "the constraint should bind"
        if iteration % 2 == 0:
            expected += coactivation_counts(plain)
        assert torch.equal(router.tracker.pending, expected), iteration
        step_routers(router, iteration)
    assert int(router.tracker.pending_tokens) == 2 * 32


def test_router_forward_makes_no_host_sync_with_every_new_option_on():
    router = _router(dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1, max_ranks_per_node=1,
                          device_balance_coeff=0.05, comm_balance_coeff=0.02, group_bias_rate=1e-3,
                          penalty_coeff=1e-3), moe_aux_loss_coeff=1e-2)
    audit = audit_router(router, H)  # 16 x 2 tokens, 3 x 2 of them padding
    assert audit.events == [], audit.summary()
    assert router.tracker.pending.sum() > 0 and router.local_tokens_per_group.sum() == 13 * 2 * K
    clear_aux_losses_tracker()


def test_group_bias_and_its_counts_stay_fp32_inside_megatrons_float16module():
    """--bf16 wraps the model in Float16Module, which casts floating buffers to bf16: a 1e-3 step
    is below bf16's spacing once |bias| >= 0.5 and integer counts above 256 round."""
    from megatron.core.transformer.module import Float16Module

    router = _router(dict(mode="group", num_groups=4, group_bias_rate=1e-3),
                     bf16=True, moe_router_dtype="fp32")  # fmt: skip
    wrapped = Float16Module(router.config, router)
    router = wrapped.module
    assert router.weight.dtype == torch.bfloat16  # the cast happened
    with torch.no_grad():
        router.group_bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))
    x = torch.randn(257, 1, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    router(x)  # every token to group 1: 257 tokens x K = 1028 loads (not a bf16 number)
    assert router.group_bias.dtype == router.local_tokens_per_group.dtype == torch.float32
    assert router.local_tokens_per_group.tolist() == [0.0, 257.0 * K, 0.0, 0.0]
    with torch.no_grad():
        router.group_bias.copy_(torch.tensor([0.5, 100.0, -0.75, 0.5]))
    step_routers(router, 0)
    torch.testing.assert_close(router.group_bias, torch.tensor([0.501, 99.999, -0.749, 0.501]),
                               rtol=0, atol=1e-6)  # fmt: skip
    state = router.state_dict()
    assert state["group_bias"].dtype == torch.float32
