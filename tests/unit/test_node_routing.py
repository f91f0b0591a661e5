"""Node-limited routing (c2r.mode='node'): property tests of the pure rule, equality with
Megatron's group-limited routing with groups = nodes (the pure function and a real TopKRouter),
and the router's config, statistics and penalty in node mode."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import group_limited_topk

from megatron_c2r.moe.router import C2RRouter
from megatron_c2r.routing.config import C2RRouterConfig, nodes_in_groups
from megatron_c2r.routing.functional import (
    contiguous_groups,
    groups_from_expert_to_group,
    node_topk,
    probs_from_selection,
)
from megatron_c2r.routing.penalty import collaboration_penalty, mass_in_group
from megatron_c2r.routing.rules import build_rule, rule_for_config
from tests.megatron_cpu import megatron_cpu, moe_config

# E, k, G (groups = EP ranks), D (nodes), M (max nodes), Q (max ranks per node or None)
SHAPES = [
    (16, 4, 4, 2, 1, None), (16, 4, 4, 2, 1, 1), (16, 4, 8, 4, 2, 1), (32, 6, 8, 4, 2, None),
    (64, 8, 16, 4, 2, 2), (64, 8, 8, 8, 4, None), (24, 3, 6, 3, 3, 2), (32, 8, 8, 2, 2, 2),
]


def _balanced_partition(num_experts, num_groups, gen):
    return torch.randperm(num_experts, generator=gen) % num_groups


@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "group_score"])
@pytest.mark.parametrize("E,k,G,D,M,Q", SHAPES)
def test_every_token_uses_at_most_m_nodes_q_ranks_per_node_and_exactly_k_experts(E, k, G, D, M, Q, anchored):
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        e2g = _balanced_partition(E, G, gen)  # any balanced placement: nodes are blocks of groups
        groups_GN = groups_from_expert_to_group(e2g, G)
        scores = torch.randn(200, E, generator=gen)
        values, idx = node_topk(scores, k, groups_GN, D, M, anchored=anchored, max_ranks_per_node=Q)
        ranks = e2g[idx]
        nodes = ranks // (G // D)
        for t in range(scores.shape[0]):
            assert len(set(idx[t].tolist())) == k
            assert len(set(nodes[t].tolist())) <= M
            if Q is not None:
                for node in set(nodes[t].tolist()):
                    assert len(set(ranks[t][nodes[t] == node].tolist())) <= Q
        assert torch.equal(values, scores.gather(1, idx))
        assert torch.all(values[:, :-1] >= values[:, 1:]), "descending, like torch.topk"
        if anchored:  # the top-1 expert is always kept
            assert torch.equal(idx[:, 0], scores.argmax(dim=-1))


@pytest.mark.parametrize("E,k,G,D,M", [(64, 8, 8, 8, 4), (64, 8, 16, 4, 2), (256, 8, 64, 8, 4), (32, 4, 8, 2, 1)])
def test_node_score_rule_equals_megatrons_group_limited_topk_with_groups_equal_to_nodes(E, k, G, D, M):
    gen = torch.Generator().manual_seed(E + D)
    scores = torch.randn(300, E, generator=gen)
    groups_GN = groups_from_expert_to_group(contiguous_groups(E, G), G)  # Megatron's expert blocks
    ours_v, ours_i = node_topk(scores, k, groups_GN, D, M, anchored=False)
    ref_v, ref_i = group_limited_topk(scores, k, 300, E, D, M)
    assert torch.equal(ours_i, ref_i) and torch.equal(ours_v, ref_v)


def test_node_rule_without_a_rank_limit_and_one_group_per_node_is_the_group_rule():
    from megatron_c2r.routing.functional import group_topk

    gen = torch.Generator().manual_seed(5)
    e2g = _balanced_partition(32, 4, gen)
    scores = torch.randn(256, 32, generator=gen)
    for anchored in (True, False):
        for m in (1, 2):
            _, ours = node_topk(scores, 4, groups_from_expert_to_group(e2g, 4), 4, m, anchored=anchored)
            _, ref = group_topk(scores, 4, e2g, 4, m, anchored=anchored)
            assert torch.equal(ours, ref)


@pytest.mark.parametrize("score_function,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_node_selection_gives_probs_zero_off_the_map_and_k_experts(score_function, pre):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(128, 32, generator=gen)
    groups_GN = groups_from_expert_to_group(contiguous_groups(32, 8), 8)
    _, idx = node_topk(logits, 4, groups_GN, 4, 2, max_ranks_per_node=1)
    probs, routing_map = probs_from_selection(
        logits, idx, score_function=score_function, use_pre_softmax=pre, scaling_factor=None
    )
    assert torch.all(routing_map.sum(dim=1) == 4)
    assert torch.all(probs[~routing_map] == 0) and torch.all(probs[routing_map] > 0)


def test_node_rule_violations_and_penalty_match_a_brute_force_count():
    gen = torch.Generator().manual_seed(7)
    E, G, D = 32, 8, 4
    e2g = _balanced_partition(E, G, gen)
    rule = build_rule("node", "anchored", topk=4, num_groups=G, max_groups=1, num_nodes=D,
                      max_nodes=2, max_ranks_per_node=1)
    tables = rule.tables(e2g, torch.zeros(E, 0, dtype=torch.int64))
    idx = torch.stack([torch.randperm(E, generator=gen)[:4] for _ in range(300)])
    routing_map = torch.zeros(300, E, dtype=torch.bool).scatter_(1, idx, True)
    nodes_of = (e2g // (G // D))
    expected = []
    for t in range(300):
        experts = routing_map[t].nonzero().flatten()
        nodes = nodes_of[experts]
        ranks_per_node = [len(set(e2g[experts][nodes == n].tolist())) for n in set(nodes.tolist())]
        expected.append(len(set(nodes.tolist())) > 2 or max(ranks_per_node) > 1)
    got = rule.violated_T(None, routing_map, None, tables, True)
    assert torch.equal(got, torch.tensor(expected))
    # The penalty's allowed set is the anchor's node.
    logits = torch.randn(300, E, generator=gen)
    got = rule.penalty(logits, tables, score_function="softmax", padding_mask_T=None)
    ref = collaboration_penalty(logits, lambda p, a: mass_in_group(p, a, nodes_of, D))
    assert torch.equal(got, ref)
    _, balance_groups_GN = rule.balance(tables)
    assert rule.num_balance_groups == D and rule.balance_limit == 2
    assert torch.equal(nodes_of[balance_groups_GN], torch.arange(D).unsqueeze(1).expand(D, E // D))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(mode="node"), r"needs c2r.num_nodes or c2r.gpus_per_node"),
        (dict(mode="node", num_nodes=3), r"c2r.num_nodes=3 must divide num_groups=8"),
        (dict(mode="node", gpus_per_node=3), r"c2r.gpus_per_node=3 splits num_groups=8 .* into unequal nodes"),
        (dict(mode="node", num_nodes=2, gpus_per_node=2),
         r"c2r.num_nodes=2 contradicts c2r.gpus_per_node=2 .* \(4 nodes\)"),
        (dict(mode="node", num_nodes=4, max_nodes=5), r"c2r.max_nodes=5 must be in \[1, num_nodes=4\]"),
        (dict(mode="node", num_nodes=4, max_ranks_per_node=3), r"c2r.max_ranks_per_node=3 must be in \[1, 2\]"),
        (dict(mode="node", num_nodes=8, max_nodes=1), r"moe_router_topk=8 exceeds c2r.max_nodes=1 x 1 ranks x 4"),
        (dict(mode="group", max_nodes=2), r"c2r.max_nodes=2 applies to c2r.mode='node' only"),
        (dict(mode="topk", group_bias_rate=1e-3), r"c2r.group_bias_rate=0.001 biases the group choice"),
        (dict(mode="node", num_nodes=0), r"c2r.num_nodes=0 must be >= 1"),
        (dict(mode="topk", num_nodes=3), r"c2r.num_nodes=3 must divide num_groups=8"),  # statistics
    ],
)
def test_bad_node_options_get_one_line_errors_naming_the_field(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        C2RRouterConfig(**cfg).resolve(num_experts=32, topk=8, ep_size=8)
    assert "\n" not in str(err.value)


def test_node_count_comes_from_gpus_per_node_or_num_nodes():
    assert nodes_in_groups(64, None, 8) == 8  # EP 64 on 8-GPU nodes
    assert nodes_in_groups(4, None, 8) == 1   # an EP group inside one node
    assert nodes_in_groups(16, 4, None) == 4
    cfg = C2RRouterConfig(mode="node", gpus_per_node=2, max_ranks_per_node=1).resolve(num_experts=32, topk=4, ep_size=8)
    assert (cfg.num_nodes, cfg.max_nodes, cfg.num_groups) == (4, 1, 8)
    rule = rule_for_config(cfg, topk=4)
    assert (rule.num_nodes, rule.max_nodes, rule.max_ranks_per_node) == (4, 1, 1)


# ---- the router in node mode, against Megatron's TopKRouter -----------------------------------
E, K, H = 32, 4, 32


@pytest.mark.usefixtures("megatron_world1")
@pytest.mark.parametrize("feature", ["softmax", "pre_softmax", "sigmoid"])
def test_node_score_router_is_bit_identical_to_megatrons_node_limited_topk_router(feature):
    overrides = {"softmax": {}, "pre_softmax": dict(moe_router_pre_softmax=True),
                 "sigmoid": dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.0)}[feature]
    base = dict(num_moe_experts=E, moe_router_topk=K, hidden_size=H, **overrides)
    torch.manual_seed(0)
    with megatron_cpu():
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron_c2r.compat import get_default_pg_collection

        stock = TopKRouter(moe_config(moe_router_num_groups=4, moe_router_group_topk=2, **base),
                           pg_collection=get_default_pg_collection())
    cfg = C2RRouterConfig(mode="node", group_selection="group_score", num_groups=8, num_nodes=4, max_nodes=2)
    ours = C2RRouter(moe_config(**base), c2r_config=cfg)
    ours.load_state_dict(stock.state_dict(), strict=False)
    x = torch.randn(40, 2, H, generator=torch.Generator().manual_seed(1))
    outs = []
    for router in (stock, ours):
        router.set_layer_number(1)
        router.train()
        xi = x.clone().requires_grad_(True)
        with megatron_cpu():
            probs, routing_map = router(xi)
            (probs * torch.arange(E, dtype=probs.dtype)).sum().backward()
        outs.append((probs.detach(), routing_map, xi.grad, router.weight.grad))
    (p0, m0, gx0, gw0), (p1, m1, gx1, gw1) = outs
    assert torch.equal(m0, m1) and torch.equal(p0, p1)
    torch.testing.assert_close(gx0, gx1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw0, gw1, rtol=1e-6, atol=1e-7)
    metrics = ours.c2r_metrics()
    assert metrics["violation_rate"] == 0.0 and metrics["nodes_per_token"] <= 2.0


@pytest.mark.usefixtures("megatron_world1")
@pytest.mark.parametrize("balancing", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
def test_node_score_router_with_the_preferred_aux_map_is_megatrons_node_limited_router_aux_loss_included(
    balancing, padding
):
    """c2r.aux_loss_map='preferred' counts the aux loss on plain top-k's map, as Megatron's
    group-limited routing does: probs, map and gradients equal TopKRouter's; so does 'auto' (the
    default: preferred in node mode); 'constrained' gives the router weight a different gradient."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    base = dict(num_moe_experts=E, moe_router_topk=K, hidden_size=H,
                moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=1e-1)
    torch.manual_seed(0)
    with megatron_cpu():
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron_c2r.compat import get_default_pg_collection

        stock = TopKRouter(moe_config(moe_router_num_groups=4, moe_router_group_topk=2, **base),
                           pg_collection=get_default_pg_collection())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, H, generator=gen)
    mask = (torch.rand(40, 2, generator=gen) < 0.2) if padding else None
    outs = []
    for aux_map in (None, "preferred", "constrained", "auto"):
        if aux_map is None:
            router = stock
        else:
            cfg = C2RRouterConfig(mode="node", group_selection="group_score", num_groups=8, num_nodes=4,
                                  max_nodes=2, aux_loss_map=aux_map)
            router = C2RRouter(moe_config(**base), c2r_config=cfg)
            router.load_state_dict(stock.state_dict(), strict=False)
        router.set_layer_number(1)
        router.train()
        xi = x.clone().requires_grad_(True)
        clear_aux_losses_tracker()
        with megatron_cpu():
            probs, routing_map = router(xi, padding_mask=mask) if padding else router(xi)
            (probs * torch.arange(E, dtype=probs.dtype)).sum().backward()
        outs.append((probs.detach(), routing_map, router.weight.grad.clone()))
    clear_aux_losses_tracker()
    (p0, m0, gw0), (p1, m1, gw1), (p2, m2, gw2), (p3, m3, gw3) = outs
    assert torch.equal(m0, m1) and torch.equal(p0, p1) and torch.equal(m0, m2) and torch.equal(m0, m3)
    torch.testing.assert_close(gw0, gw1, rtol=1e-6, atol=1e-7)
    assert torch.equal(gw1, gw3), "auto is the preferred map in node mode"
    assert not torch.allclose(gw0, gw2, rtol=1e-4, atol=1e-6), "the constrained map counts other loads"


def test_aux_loss_map_must_be_one_of_its_names():
    with pytest.raises(ValueError, match=r"c2r.aux_loss_map='top_k' must be one of auto, constrained, preferred"):
        C2RRouterConfig(mode="node", num_nodes=4, aux_loss_map="top_k")


@pytest.mark.parametrize("mode", ["node", "group", "c2r", "group_balanced", "topk"])
def test_auto_aux_loss_map_is_preferred_in_node_mode_only(mode):
    """'auto' resolves by mode (node: Megatron's map, measured better with training; elsewhere
    the constrained map); an explicit name wins in every mode."""
    extra = dict(num_nodes=4) if mode == "node" else dict(top_t=3) if mode == "c2r" else {}
    resolved = {m: C2RRouterConfig(mode=mode, aux_loss_map=m, **extra).aux_loss_counts_preferred
                for m in ("auto", "constrained", "preferred")}
    assert resolved == {"auto": mode == "node", "constrained": False, "preferred": True}
    assert C2RRouterConfig(mode=mode, **extra).aux_loss_map == "auto"


@pytest.mark.usefixtures("megatron_world1")
def test_node_anchored_router_with_a_rank_limit_keeps_tokens_inside_the_rule():
    e2g = tuple(int(g) for g in _balanced_partition(E, 8, torch.Generator().manual_seed(9)))
    cfg = C2RRouterConfig(mode="node", num_groups=8, gpus_per_node=2, max_nodes=2, max_ranks_per_node=1,
                          expert_to_group=e2g, penalty_coeff=1e-2)
    router = C2RRouter(moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H, moe_aux_loss_coeff=1e-2),
                       c2r_config=cfg)
    router.set_layer_number(1)
    probs, routing_map = router(torch.randn(64, 2, H))
    groups = torch.tensor(e2g)
    for t in range(routing_map.shape[0]):
        ranks = groups[routing_map[t]]
        assert routing_map[t].sum() == K and len(set((ranks // 2).tolist())) <= 2
        assert len(set(ranks.tolist())) == len(set((ranks // 2).tolist())), "one rank per node"
    assert torch.all(probs[~routing_map] == 0)
    probs.sum().mul(0).backward()  # aux loss and penalty attached: the router weight gets a grad
    assert router.weight.grad.abs().sum() > 0
    metrics = router.c2r_metrics()
    assert metrics["violation_rate"] == 0.0 and metrics["nodes_per_token"] <= 2.0 and metrics["penalty"] > 0


def test_new_router_options_travel_through_the_c2r_flags_unchanged():
    import argparse

    from megatron_c2r.megatron_lm.arguments import add_c2r_args, c2r_options_from_args
    from megatron_c2r.megatron_lm.flags import c2r_argv
    from megatron_c2r.moe.options import C2ROptions

    router = C2RRouterConfig(mode="node", gpus_per_node=8, max_nodes=2, max_ranks_per_node=1,
                             group_selection="group_score", device_balance_coeff=0.05,
                             comm_balance_coeff=0.02, group_bias_rate=1e-3, preference_sample_interval=4)
    options = C2ROptions(router=router)
    argv = c2r_argv(options)
    assert "--c2r-max-ranks-per-node" in argv and "--c2r-num-nodes" not in argv  # None: not written
    parsed = c2r_options_from_args(add_c2r_args(argparse.ArgumentParser()).parse_args(argv))
    assert parsed == options


@pytest.mark.usefixtures("megatron_world1")
@pytest.mark.parametrize("c2r_kwargs,megatron_kwargs", [
    (dict(mode="topk", num_nodes=4), {}),  # node statistics of plain top-k
    (dict(mode="topk", num_nodes=4), dict(moe_router_num_groups=4, moe_router_group_topk=1)),  # Megatron's
    (dict(mode="node", num_nodes=4, max_nodes=2), {}),
    (dict(mode="group", max_groups=2), {}),  # no node layout: no node statistics
], ids=["topk", "megatron_node_limited", "node_M2", "group_no_nodes"])
def test_router_balance_and_node_statistics_match_a_brute_force_count(c2r_kwargs, megatron_kwargs):
    # Megatron's group-limited routing knows contiguous blocks only; the others get a partition.
    e2g = tuple(int(g) for g in _balanced_partition(E, 8, torch.Generator().manual_seed(3)))
    e2g = tuple(int(g) for g in contiguous_groups(E, 8)) if megatron_kwargs else e2g
    cfg = C2RRouterConfig(num_groups=8, expert_to_group=e2g, **c2r_kwargs)
    router = C2RRouter(moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H, **megatron_kwargs),
                       c2r_config=cfg)
    router.set_layer_number(1)
    gen = torch.Generator().manual_seed(4)
    x, pad = torch.randn(40, 2, H, generator=gen), torch.rand(40, 2, generator=gen) < 0.25
    _, routing_map = router(x, padding_mask=pad)
    metrics = router.c2r_metrics()
    groups, valid = torch.tensor(e2g), ~pad.reshape(-1)
    used = routing_map[valid]
    pairs_G = torch.tensor([float(used[:, groups == g].sum()) for g in range(8)])
    assert metrics["group_load_max_over_mean"] == pytest.approx(float(pairs_G.max() / pairs_G.mean()))
    if cfg.num_nodes is None:
        assert "nodes_per_token" not in metrics and "node_load_max_over_mean" not in metrics
        return
    nodes = groups // 2  # 8 groups on 4 nodes: contiguous pairs of groups
    per_token = [len(set(nodes[row].tolist())) for row in used]
    assert metrics["nodes_per_token"] == pytest.approx(sum(per_token) / len(per_token))
    pairs_D = pairs_G.view(4, 2).sum(dim=1)
    assert metrics["node_load_max_over_mean"] == pytest.approx(float(pairs_D.max() / pairs_D.mean()))
    if c2r_kwargs["mode"] == "node" or megatron_kwargs:
        limit = c2r_kwargs.get("max_nodes", megatron_kwargs.get("moe_router_group_topk"))
        assert max(per_token) <= limit
