"""C2RRouter against Megatron-core's TopKRouter, and its own invariants, on CPU."""

import dataclasses
import functools

import pytest
import torch

from megatron_c2r.moe.router import C2RRouter, step_routers
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import megatron_cpu, moe_config

pytestmark = pytest.mark.usefixtures("megatron_world1")

E, K, H = 16, 4, 32

TOPK_FEATURES = {
    "softmax": {},
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sigmoid_bias_scaling": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
    ),
    "group_limited": dict(moe_router_num_groups=4, moe_router_group_topk=2),
    "aux_and_z_loss": dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),
    "seq_aux_loss": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2),
    "global_aux_loss": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2),
    "aux_loss_list": dict(
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[1e-2, 2e-2]
    ),
    "capacity_probs": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    "capacity_position": dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"),
    "fp64_router": dict(moe_router_dtype="fp64"),
    "fp32_router": dict(moe_router_dtype="fp32"),
}


def make_config(**overrides):
    base = dict(num_moe_experts=E, moe_router_topk=K, hidden_size=H)
    base.update(overrides)
    return moe_config(**base)


def make_pair(config, c2r_config):
    torch.manual_seed(0)
    with megatron_cpu():
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron_c2r.compat import get_default_pg_collection

        stock = TopKRouter(config, pg_collection=get_default_pg_collection())
    ours = C2RRouter(config, c2r_config=c2r_config)
    ours.load_state_dict(stock.state_dict(), strict=False)
    for r in (stock, ours):
        r.set_layer_number(1)
        r.train()
    return stock, ours


@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("feature", sorted(TOPK_FEATURES))
def test_topk_mode_is_bit_identical_to_megatron_topk_router(feature, padding):
    overrides = TOPK_FEATURES[feature]
    if padding and overrides.get("moe_router_enable_expert_bias"):
        pytest.skip("stock 0.16.1 TopKRouter cannot combine expert bias with a padding mask")
    config = make_config(**overrides)
    stock, ours = make_pair(config, C2RRouterConfig(mode="topk"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 2, H, generator=gen)
    mask = (torch.rand(24, 2, generator=gen) < 0.2) if padding else None
    for step in range(2):  # the second step exercises global aux-loss accumulation
        outs = []
        for router in (stock, ours):
            router.zero_grad()
            xi = x.clone().requires_grad_(True)
            with megatron_cpu() if router is stock else _nothing():
                probs, routing_map = router(xi, padding_mask=mask)
                (probs * torch.arange(E, dtype=probs.dtype)).sum().backward()
            outs.append((probs.detach(), routing_map, xi.grad, router.weight.grad.clone()))
        (p0, m0, gx0, gw0), (p1, m1, gx1, gw1) = outs
        assert torch.equal(m0, m1), f"routing_map differs at step {step}"
        assert torch.equal(p0, p1), f"probs differ at step {step}"
        torch.testing.assert_close(gx0, gx1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw0, gw1, rtol=1e-6, atol=1e-7)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _route(router, x, mask=None):
    probs, routing_map = router(x, padding_mask=mask)
    return probs, routing_map


def test_c2r_mode_routes_inside_the_top_t_list_of_each_top1_expert():
    config = make_config()
    router = C2RRouter(config, c2r_config=C2RRouterConfig(mode="c2r", top_t=3))
    gen = torch.Generator().manual_seed(0)
    lists = torch.stack([torch.tensor([(e + d) % E for d in (1, 2, 5)]) for e in range(E)])
    router.set_top_t_lists(lists)
    probs, routing_map = _route(router, torch.randn(64, 2, H, generator=gen))
    top1 = probs.argmax(dim=1)
    for t in range(probs.shape[0]):
        chosen = set(routing_map[t].nonzero().flatten().tolist())
        assert len(chosen) == K
        assert chosen - {int(top1[t])} <= set(lists[top1[t]].tolist())
    assert torch.all(probs[~routing_map] == 0)
    assert router.c2r_metrics()["violation_rate"] == 0.0


@pytest.mark.parametrize("selection", ["anchored", "group_score"])
@pytest.mark.parametrize("max_groups", [1, 2])
def test_group_mode_never_uses_more_than_max_groups(selection, max_groups):
    config = make_config(moe_aux_loss_coeff=1e-2)
    e2g = tuple(int(g) for g in torch.randperm(E, generator=torch.Generator().manual_seed(4)) % 4)
    cfg = C2RRouterConfig(mode="group", num_groups=4, max_groups=max_groups,
                          group_selection=selection, expert_to_group=e2g)
    router = C2RRouter(config, c2r_config=cfg)
    router.set_layer_number(1)
    probs, routing_map = _route(router, torch.randn(100, 2, H))
    groups = torch.tensor(e2g)
    for t in range(routing_map.shape[0]):
        experts = routing_map[t].nonzero().flatten()
        assert experts.numel() == K
        assert len(set(groups[experts].tolist())) <= max_groups
    metrics = router.c2r_metrics()
    assert metrics["violation_rate"] == 0.0 and metrics["groups_per_token"] <= max_groups


@pytest.mark.parametrize(
    "c2r_config,overrides",
    [
        (C2RRouterConfig(mode="group"), dict(moe_aux_loss_coeff=0.0)),
        (C2RRouterConfig(mode="c2r", top_t=5, warmup_steps=0), dict(moe_aux_loss_coeff=0.0)),
        (C2RRouterConfig(mode="topk"), dict(moe_aux_loss_coeff=0.0)),
    ],
    ids=["group", "c2r", "topk"],
)
def test_router_weight_grad_is_nonzero_iff_a_loss_coefficient_is_nonzero(c2r_config, overrides):
    import dataclasses

    for aux, penalty in [(0.0, 0.0), (1e-2, 0.0), (0.0, 1e-2)]:
        config = make_config(**dict(overrides, moe_aux_loss_coeff=aux))
        cfg = dataclasses.replace(c2r_config, penalty_coeff=penalty, num_groups=4)
        router = C2RRouter(config, c2r_config=cfg)
        router.set_layer_number(1)
        if cfg.mode == "c2r":
            router.set_top_t_lists(torch.stack([torch.tensor([(e + d) % E for d in range(1, 6)]) for e in range(E)]))
        probs, _ = _route(router, torch.randn(32, 2, H))
        probs.sum().mul_(0).backward()
        nonzero = bool(router.weight.grad.abs().sum() > 0)
        assert nonzero == (aux > 0 or penalty > 0), (cfg.mode, aux, penalty)


def test_collaboration_penalty_gradient_pulls_mass_into_the_anchor_group():
    config = make_config()
    router = C2RRouter(config, c2r_config=C2RRouterConfig(mode="group", num_groups=4, penalty_coeff=1.0))
    router.set_layer_number(1)
    x = torch.randn(64, 2, H, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(router.parameters(), lr=50.0)
    penalties = []
    for _ in range(6):
        opt.zero_grad()
        probs, _ = _route(router, x)
        penalties.append(router.c2r_metrics()["penalty"])
        probs.sum().mul_(0).backward()  # only the attached penalty produces a gradient
        opt.step()
    assert all(b < a for a, b in zip(penalties, penalties[1:])), penalties
    assert penalties[-1] < 0.8 * penalties[0], penalties


def test_warmup_routes_plain_topk_then_derives_lists_from_the_tracker_and_resumes_identically():
    config = make_config()
    cfg = C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=2)
    router = C2RRouter(config, c2r_config=cfg)
    stock_like = C2RRouter(config, c2r_config=C2RRouterConfig(mode="topk"))
    stock_like.load_state_dict({"weight": router.weight.detach()}, strict=False)
    x = torch.randn(64, 2, H, generator=torch.Generator().manual_seed(6))
    for it in range(2):
        _, m_warm = _route(router, x)
        _, m_topk = _route(stock_like, x)
        assert torch.equal(m_warm, m_topk), "warm-up must be plain top-k"
        step_routers(router, it)
    assert bool(router.constraint_active)
    from megatron_c2r.collaboration import top_t_lists
    assert torch.equal(router.top_t_lists, top_t_lists(router.tracker.counts, 3))
    assert int(router.tracker.tokens) == 2 * 128

    state = {k: v.clone() for k, v in router.state_dict().items()}
    resumed = C2RRouter(config, c2r_config=cfg)
    resumed.load_state_dict(state)
    router.eval(), resumed.eval()
    with torch.no_grad():
        assert torch.equal(_route(router, x)[1], _route(resumed, x)[1])


@pytest.mark.parametrize("mode", ["c2r", "group"])
def test_refresh_windows_count_plain_topk_preference_and_rederive_lists_from_the_window(mode):
    from megatron_c2r.collaboration import coactivation_counts, top_t_lists

    config = make_config()
    cfg = C2RRouterConfig(mode=mode, top_t=3, num_groups=4, max_groups=1, warmup_steps=1,
                          refresh_interval=2)
    router = C2RRouter(config, c2r_config=cfg)
    gen = torch.Generator().manual_seed(11)
    _route(router, torch.randn(64, 2, H, generator=gen))
    assert [router.refresh_due(it) for it in range(6)] == [False, False, True, False, True, False]
    step_routers(router, 0)  # warm-up ends: lists derived, window restarts
    assert bool(router.constraint_active) and int(router.tracker.counts.sum()) == 0
    windows = [torch.randn(64, 2, H, generator=gen) for _ in range(2)]
    preferred = torch.zeros(E, E, dtype=torch.int64)
    for it, x in enumerate(windows, start=1):
        _, routing_map = _route(router, x)
        with torch.no_grad():
            logits = router.gating(x.view(-1, H))
        plain_map = torch.zeros_like(routing_map).scatter_(1, logits.topk(K, dim=1).indices, True)
        assert not torch.equal(routing_map, plain_map), "the constraint should bind here"
        preferred += coactivation_counts(plain_map)
        if it == 2:  # the window's counts are plain top-k's, not the constrained map's
            router.tracker.reduce_()
            assert torch.equal(router.tracker.counts, preferred)
            if mode == "c2r":
                expected_lists = top_t_lists(preferred, 3)
        step_routers(router, it)
    assert int(router.tracker.counts.sum()) == 0, "each refresh starts a new window"
    if mode == "c2r":
        assert torch.equal(router.top_t_lists, expected_lists)


def test_relabelling_experts_permutes_routing_consistently():
    config = make_config()
    router = C2RRouter(config, c2r_config=C2RRouterConfig(mode="c2r", top_t=3))
    router.set_top_t_lists(torch.stack([torch.tensor([(e + d) % E for d in (1, 2, 5)]) for e in range(E)]))
    x = torch.randn(50, 2, H)
    router.eval()
    with torch.no_grad():
        p_before, m_before = _route(router, x)
        order = torch.randperm(E, generator=torch.Generator().manual_seed(7))
        router.relabel_experts_(order)
        p_after, m_after = _route(router, x)
    assert torch.equal(m_after, m_before[:, order])
    assert torch.equal(p_after, p_before[:, order])


@pytest.mark.parametrize(
    "cfg,overrides,match",
    [
        (dict(mode="c2r", top_t=2), {}, r"c2r.top_t=2 must satisfy moe_router_topk-1=3"),
        (dict(mode="c2r", top_t=16), {}, r"c2r.top_t=16 must satisfy .* num_moe_experts-1=15"),
        (dict(mode="group", num_groups=3), {}, r"num_moe_experts=16 must be divisible by c2r.num_groups=3"),
        (dict(mode="group", num_groups=4, max_groups=5), {}, r"c2r.max_groups=5 must be in \[1, num_groups=4\]"),
        (dict(mode="group", num_groups=8, max_groups=1), {}, r"moe_router_topk=4 exceeds c2r.max_groups=1 x 2"),
        (dict(mode="c2r"), {}, r"c2r.top_t is required"),
        (dict(mode="bogus"), {}, r"c2r.mode='bogus' must be one of"),
        (dict(mode="group"), dict(moe_router_num_groups=4, moe_router_group_topk=1), r"unset moe_router_num_groups=4"),
    ],
)
def test_bad_router_options_fail_at_construction_with_one_line_errors(cfg, overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        C2RRouter(make_config(**overrides), c2r_config=C2RRouterConfig(**cfg))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cfg,sizes,match",
    [
        (dict(mode="group"), dict(num_experts=8, topk=9, ep_size=2), r"^moe_router_topk=9 must be in \[1, num_moe_experts=8\]"),
        (dict(mode="topk"), dict(num_experts=8, topk=0, ep_size=1), r"^moe_router_topk=0 must be in \[1"),
        (dict(mode="group"), dict(num_experts=8, topk=2, ep_size=3), r"^num_moe_experts=8 must be divisible by expert_model_parallel_size=3"),
        (dict(mode="group", num_groups=3), dict(num_experts=8, topk=2, ep_size=2), r"^num_moe_experts=8 must be divisible by c2r.num_groups=3"),
    ],
)
def test_config_resolve_checks_topk_against_the_experts_first_and_groups_with_one_rule(cfg, sizes, match):
    with pytest.raises(ValueError, match=match) as err:
        C2RRouterConfig(**cfg).resolve(**sizes)
    assert "\n" not in str(err.value)


def test_c2r_mode_without_warmup_refuses_to_route_before_lists_are_loaded():
    router = C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=0))
    with pytest.raises(ValueError, match=r"needs top-T lists before the first forward"):
        _route(router, torch.randn(4, 2, H))


def test_nan_logits_raise_before_any_collective():
    router = C2RRouter(make_config(moe_aux_loss_coeff=1e-2), c2r_config=C2RRouterConfig(mode="group", num_groups=4))
    x = torch.randn(8, 2, H)
    x[3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"router logits of layer .* hold NaN/Inf for 1 of 16 tokens"):
        _route(router, x)


def test_router_in_a_real_megatron_moe_layer_runs_forward_and_backward_on_cpu():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_c2r.compat import moe_submodules

    config = make_config(moe_aux_loss_coeff=1e-2)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
    submodules = moe_submodules(spec)
    import dataclasses

    submodules = dataclasses.replace(
        submodules, router=functools.partial(C2RRouter, c2r_config=C2RRouterConfig(mode="group", num_groups=4))
    )
    with megatron_cpu():  # for the stock alltoall dispatcher only
        layer = MoELayer(config, submodules, layer_number=1)
        assert isinstance(layer.router, C2RRouter)
        x = torch.randn(16, 2, H, requires_grad=True)
        out, _ = layer(x)
        out.sum().backward()
    assert out.shape == x.shape
    assert x.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0
    assert layer.router.c2r_metrics()["groups_per_token"] == 1.0


def test_aux_loss_in_a_constrained_mode_is_computed_on_the_constrained_routing_map():
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        switch_load_balancing_loss_func,
    )

    coeff = 1e-2
    router = C2RRouter(make_config(moe_aux_loss_coeff=coeff), c2r_config=C2RRouterConfig(mode="group", num_groups=4))
    router.set_layer_number(1)
    clear_aux_losses_tracker()
    x = torch.randn(40, 2, H)
    probs, routing_map = _route(router, x)
    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    scores = torch.softmax(router.gating(x).view(-1, E), dim=-1)
    expected = switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=routing_map.sum(0), total_num_tokens=80, topk=K,
        num_experts=E, moe_aux_loss_coeff=coeff,
    ) / coeff
    torch.testing.assert_close(logged, expected.detach())
    clear_aux_losses_tracker()


def _two_c2r_routers(top_t=3):
    return torch.nn.ModuleList(
        C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="c2r", top_t=top_t)) for _ in range(2)
    )


def test_top_t_lists_load_from_a_plan_file_translated_to_relabelled_ids(tmp_path):
    from megatron_c2r.moe.lists import load_top_t_lists_
    from megatron_c2r.placement.plan_file import Plan, PlanLayer, write_plan

    order = torch.randperm(E, generator=torch.Generator().manual_seed(3)).tolist()
    groups = [sorted(order[i:i + 4]) for i in range(0, E, 4)]
    lists = [[(e + d) % E for d in (1, 2, 5)] for e in range(E)]
    e2r = [0] * E
    for g, members in enumerate(groups):
        for e in members:
            e2r[e] = g
    layers = [PlanLayer(i, groups, e2r, {"identity": 2.0, "random": 2.0, "planned": 1.5}, lists)
              for i in range(2)]
    path = str(tmp_path / "plan.json")
    write_plan(Plan(num_experts=E, ep_size=4, top_k=K, layers=layers), path)

    routers = _two_c2r_routers()
    assert load_top_t_lists_(routers, path, relabelled=False) == 2
    assert routers[1].top_t_lists.tolist() == lists and bool(routers[1].constraint_active)
    load_top_t_lists_(routers, path, relabelled=True)
    flat = [e for g in groups for e in g]  # new id i = old expert flat[i]
    new_id = {old: new for new, old in enumerate(flat)}
    assert routers[0].top_t_lists.tolist() == [[new_id[p] for p in lists[old]] for old in flat]


def test_top_t_lists_from_a_tensor_file_are_validated_before_any_router_changes(tmp_path):
    from megatron_c2r.moe.lists import load_top_t_lists_

    good = torch.stack([torch.tensor([(e + d) % E for d in (1, 2, 5)]) for e in range(E)])
    bad = good.clone()
    bad[4, 0] = 4  # expert 4 listed as its own collaborator
    torch.save(torch.stack([good, bad]), tmp_path / "lists.pt")
    routers = _two_c2r_routers()
    with pytest.raises(ValueError, match=r"top_t_lists\[4\] contains expert 4 itself"):
        load_top_t_lists_(routers, str(tmp_path / "lists.pt"))
    assert not routers[0].top_t_lists.any() and not bool(routers[0].constraint_active)
    torch.save(good, tmp_path / "one.pt")
    assert load_top_t_lists_(routers, str(tmp_path / "one.pt")) == 2
    assert torch.equal(routers[0].top_t_lists, good)


def test_loading_a_state_dict_with_other_groups_rebuilds_the_routers_group_tables():
    """The group tables are cached on the first forward; a checkpoint with another
    expert_to_group (loaded in place) must be what the next forward selects and counts with."""
    config = make_config()
    cfg = C2RRouterConfig(mode="group", num_groups=4, max_groups=1)
    router = C2RRouter(config, c2r_config=cfg)  # default contiguous groups
    x = torch.randn(64, 2, H, generator=torch.Generator().manual_seed(12))
    router.eval()
    with torch.no_grad():
        _route(router, x)  # fills the caches with the contiguous groups
    loaded_groups = torch.randperm(E, generator=torch.Generator().manual_seed(13)) % 4
    reference = C2RRouter(config, c2r_config=dataclasses.replace(cfg, expert_to_group=tuple(loaded_groups.tolist())))
    reference.load_state_dict({"weight": router.weight.detach()}, strict=False)
    router.load_state_dict(reference.state_dict())
    reference.eval()
    with torch.no_grad():
        _, routing_map = _route(router, x)
        _, expected_map = _route(reference, x)
    assert torch.equal(routing_map, expected_map), "selection used the groups cached before the load"
    used = [len(set(loaded_groups[routing_map[t]].tolist())) for t in range(routing_map.shape[0])]
    assert max(used) == 1
    assert router.c2r_metrics()["groups_per_token"] == 1.0 and router.c2r_metrics()["violation_rate"] == 0.0


def test_topk_and_c2r_modes_accept_more_experts_per_token_than_one_group_holds():
    # 8 groups of 2 experts, top-4: only group mode with max_groups=1 must refuse this.
    for cfg in (C2RRouterConfig(mode="topk", num_groups=8), C2RRouterConfig(mode="c2r", top_t=5, num_groups=8)):
        router = C2RRouter(make_config(), c2r_config=cfg)
        if cfg.mode == "c2r":
            router.set_top_t_lists(torch.stack([torch.tensor([(e + d) % E for d in range(1, 6)]) for e in range(E)]))
        _, routing_map = _route(router, torch.randn(16, 2, H))
        assert torch.all(routing_map.sum(dim=1) == K)
        assert router.c2r_metrics()["groups_per_token"] >= 2.0  # 4 experts need >= 2 groups of 2
    with pytest.raises(ValueError, match=r"moe_router_topk=4 exceeds c2r.max_groups=1 x 2"):
        C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="group", num_groups=8))


def test_deferred_finite_check_records_a_device_flag_instead_of_raising():
    router = C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="group", num_groups=4))
    router.set_layer_number(3)
    router.defer_finite_check = True
    x = torch.randn(8, 2, H)
    _route(router, x)
    flag = router.logits_finite
    assert isinstance(flag, torch.Tensor) and flag.dim() == 0 and flag.dtype == torch.bool and bool(flag)
    x[2, 0, 5] = float("inf")
    _route(router, x)  # no raise, no sync: the layer decides after its count exchange
    assert not bool(router.logits_finite)
    err = router.nonfinite_logits_error("on EP rank(s) [1]")
    assert str(err) == ("router logits of layer 3 hold NaN/Inf on EP rank(s) [1]: check the input "
                        "activations / lower the LR")
    router.defer_finite_check = False
    with pytest.raises(ValueError, match=r"layer 3 hold NaN/Inf for 1 of 16 tokens"):
        _route(router, x)
    quiet = C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="group", num_groups=4, check_finite_logits=False))
    quiet.defer_finite_check = True
    _route(quiet, x)
    assert quiet.logits_finite is None


def test_gating_runs_megatrons_own_gating_exactly_where_compat_chooses_it(monkeypatch):
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron_c2r import compat

    assert compat.use_stock_router_gating(torch.device("cuda", 0), te_gemm_defined=True)
    assert compat.use_stock_router_gating("cuda", te_gemm_defined=True)
    # 0.16.1 without transformer-engine leaves te_general_gemm undefined: the stock gating would
    # raise NameError on CUDA, so ours runs there too.
    assert not compat.use_stock_router_gating("cuda", te_gemm_defined=False)
    assert not compat.use_stock_router_gating(torch.device("cpu"))
    router = C2RRouter(make_config(moe_router_dtype="fp32", params_dtype=torch.bfloat16, bf16=True),
                       c2r_config=C2RRouterConfig(mode="topk"))
    x = torch.randn(4, 2, H, dtype=torch.bfloat16)

    def stock_gating(self, inp):
        raise AssertionError("stock gating called on a CPU router")

    monkeypatch.setattr(TopKRouter, "gating", stock_gating)
    logits = router.gating(x)  # CPU: the device-agnostic path
    assert logits.dtype == torch.float32
    expected = x.float().view(-1, H) @ router.weight.float().t()
    torch.testing.assert_close(logits.view(-1, E), expected)
    sentinel = torch.zeros(())
    monkeypatch.setattr(TopKRouter, "gating", lambda self, inp: sentinel)
    monkeypatch.setattr(compat, "use_stock_router_gating", lambda device: True)  # as on CUDA
    assert router.gating(x) is sentinel


def test_unknown_router_keywords_get_a_one_line_error():
    with pytest.raises(TypeError, match=r"does not accept \['no_such_flag'\]") as err:
        C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="topk"), no_such_flag=True)
    assert "\n" not in str(err.value)


def test_statistics_with_padding_average_over_the_real_tokens_only():
    e2g = torch.randperm(E, generator=torch.Generator().manual_seed(14)) % 4
    router = C2RRouter(make_config(), c2r_config=C2RRouterConfig(mode="topk", num_groups=4, expert_to_group=tuple(e2g.tolist())))
    gen = torch.Generator().manual_seed(15)
    x, mask = torch.randn(30, 2, H, generator=gen), torch.rand(30, 2, generator=gen) < 0.3
    _, routing_map = _route(router, x, mask)
    valid = ~mask.reshape(-1)
    groups = torch.tensor([len(set(e2g[routing_map[t]].tolist())) for t in range(60)], dtype=torch.float32)
    metrics = router.c2r_metrics()
    assert metrics["groups_per_token"] == pytest.approx(float(groups[valid].mean()), abs=1e-6)
    assert metrics["violation_rate"] == pytest.approx(float((groups[valid] > 1).float().mean()), abs=1e-6)
