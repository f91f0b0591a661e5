"""In-model relabelling is a symmetry: a real megatron.core MoELayer (stock TopKRouter, alltoall
dispatcher, SequentialMLP) computes the same outputs after relabelling, and with the optimizer
state permuted too, training continues exactly as the un-relabelled layer would.
Megatron pieces run in the session's 1-process gloo pool (parallel state needs a world)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from megatron_c2r.compat import moe_submodules
import torch.nn.functional as F

from megatron_c2r.placement.permutation import check_order, local_expert_slots, permute_slots_
from megatron_c2r.placement.relabel import relabel_moe_layer_
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

H, FFN, E = 16, 8, 8


def build_stock_layer(**overrides):
    """Stock MoELayer on CPU; expert e's weights from a generator seeded by e (all distinct)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    init_parallel(ep=1)
    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E, **overrides)
    spec = get_moe_module_spec(use_te=False, num_experts=E)
    torch.manual_seed(0)
    with megatron_cpu():
        layer = MoELayer(config, moe_submodules(spec))
    for e, expert in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(100 + e)
        for p in expert.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    if getattr(layer.router, "expert_bias", None) is not None:
        layer.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(7)))
    return layer


def _x(seed, tokens=24):
    return torch.randn(tokens, 1, H, generator=torch.Generator().manual_seed(seed))


def _outputs_before_and_after_relabel(overrides):
    with megatron_cpu():
        layer = build_stock_layer(**overrides)
        x = _x(1)
        out0, _ = layer(x)
        probs0, map0 = layer.router(x)
        order = torch.randperm(E, generator=torch.Generator().manual_seed(3))
        relabel_moe_layer_(layer, order)
        out1, _ = layer(x)
        probs1, map1 = layer.router(x)
    return dict(
        out_err=float((out1 - out0).abs().max()),
        scale=float(out0.abs().max()),
        map_permuted=bool(torch.equal(map1, map0[:, order])),
        probs_err=float((probs1 - probs0[:, order]).abs().max()),
        experts_moved=not torch.equal(order, torch.arange(E)),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_router_topk": 3, "moe_router_pre_softmax": True},
        {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
    ],
    ids=["softmax_top2", "pre_softmax_top3", "sigmoid_expert_bias"],
)
def test_relabelling_a_stock_moe_layer_leaves_its_outputs_unchanged(dist_pool, overrides):
    (r,) = dist_pool(1).run(_outputs_before_and_after_relabel, overrides)
    assert r["experts_moved"] and r["map_permuted"]
    assert r["out_err"] <= 1e-6 * max(1.0, r["scale"])
    assert r["probs_err"] <= 1e-6


def _train_step(layer, opt, x):
    opt.zero_grad()
    out, _ = layer(x)
    loss = (out.float() ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss)


def _optimizer_state_follows_the_experts():
    with megatron_cpu():
        kw = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
        a, b = build_stock_layer(**kw), build_stock_layer(**kw)
        opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
        opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
        _train_step(a, opt_a, _x(10))
        _train_step(b, opt_b, _x(10))
        order = torch.randperm(E, generator=torch.Generator().manual_seed(5))
        relabel_moe_layer_(a, order, optimizer=opt_a)
        loss_a = _train_step(a, opt_a, _x(11))
        loss_b = _train_step(b, opt_b, _x(11))
        out_a, _ = a(_x(12))
        out_b, _ = b(_x(12))
        # Expert i of a is expert order[i] of b, exp_avg_sq included.
        sq_err = max(
            float((opt_a.state[pa]["exp_avg_sq"] - opt_b.state[pb]["exp_avg_sq"]).abs().max())
            for i, old in enumerate(order.tolist())
            for pa, pb in zip(a.experts.local_experts[i].parameters(),
                              b.experts.local_experts[old].parameters())
        )
        router_err = float((opt_a.state[a.router.weight]["exp_avg"]
                            - opt_b.state[b.router.weight]["exp_avg"][order]).abs().max())
    return dict(loss_err=abs(loss_a - loss_b), out_err=float((out_a - out_b).abs().max()),
                scale=float(out_b.abs().max()), sq_err=sq_err, router_err=router_err)


def test_relabelling_with_the_optimizer_continues_training_exactly_as_without(dist_pool):
    (r,) = dist_pool(1).run(_optimizer_state_follows_the_experts)
    assert r["loss_err"] <= 1e-6
    assert r["out_err"] <= 1e-6 * max(1.0, r["scale"])
    assert r["sq_err"] <= 1e-9 and r["router_err"] <= 1e-9


def _grouped_mlp_slots_follow_its_forward_views():
    """GroupedMLP needs grouped_gemm to run; built here with the availability check skipped, its
    weights are checked against the per-expert views its forward uses."""
    from megatron.core.transformer.moe import grouped_gemm_util
    from megatron.core.transformer.moe.experts import GroupedMLP
    from megatron_c2r import compat

    init_parallel(ep=1)
    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E,
                        moe_grouped_gemm=True)
    with megatron_cpu(), mock.patch.object(grouped_gemm_util, "assert_grouped_gemm_is_available",
                                           lambda: None):
        experts = GroupedMLP(E, config, compat.get_default_pg_collection())

    def per_expert(m):  # GroupedMLP.forward: w1 = weight1.view(E, H, -1), w2 = weight2.view(E, -1, H)
        w1 = m.weight1.view(E, H, -1)
        w2 = m.weight2.view(E, -1, H)
        x = _x(20, tokens=5).view(5, H)
        return torch.stack([F.gelu(x @ w1[e]) @ w2[e] for e in range(E)])

    before = per_expert(experts)
    order = torch.randperm(E, generator=torch.Generator().manual_seed(8))
    permute_slots_(local_expert_slots(experts), order)
    after = per_expert(experts)
    return float((after - before[order]).abs().max())


def test_grouped_mlp_experts_are_relabelled_as_its_forward_sees_them(dist_pool):
    # GroupedMLP (and this module) exist through 0.17; newer releases dropped the legacy class.
    pytest.importorskip("megatron.core.transformer.moe.grouped_gemm_util")
    (err,) = dist_pool(1).run(_grouped_mlp_slots_follow_its_forward_views)
    assert err == 0.0


def test_orders_that_are_not_permutations_are_rejected_naming_the_fix():
    with pytest.raises(ValueError, match="not a permutation of 0..3"):
        check_order([0, 1, 1, 3], 4)
    with pytest.raises(ValueError, match="not a permutation"):
        check_order([0, 1, 2], 4)
    assert check_order([3, 2, 1, 0], 4).tolist() == [3, 2, 1, 0]


def _c2r_layer_outputs_before_and_after_relabel():
    """Our stack: C2RMoELayer (dedup dispatcher) + C2RRouter in the paper's c2r mode. Its own
    ``relabel_experts_`` permutes weights, expert bias and the top-T lists (ids remapped)."""
    import dataclasses
    import functools

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r.moe.layer import C2RMoELayer
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=1)
    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E,
                        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    spec = get_moe_module_spec(use_te=False, num_experts=E)
    router = functools.partial(C2RRouter, c2r_config=C2RRouterConfig(mode="c2r", top_t=3))
    torch.manual_seed(0)
    layer = C2RMoELayer(config, dataclasses.replace(moe_submodules(spec), router=router))
    for e, expert in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(100 + e)
        for p in expert.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    layer.router.expert_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(7)))
    layer.router.set_top_t_lists(torch.stack([torch.tensor([(e + d) % E for d in (1, 3, 4)])
                                              for e in range(E)]))
    x = _x(1)
    out0, _ = layer(x)
    order = torch.randperm(E, generator=torch.Generator().manual_seed(3))
    relabel_moe_layer_(layer, order)
    out1, _ = layer(x)
    return float((out1 - out0).abs().max()), float(out0.abs().max())


def test_relabelling_our_c2r_layer_leaves_its_outputs_unchanged(dist_pool):
    (r,) = dist_pool(1).run(_c2r_layer_outputs_before_and_after_relabel)
    err, scale = r
    assert err <= 1e-6 * max(1.0, scale)
