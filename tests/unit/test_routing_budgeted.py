"""Budgeted relaxation and the soft locality bias (issue 27): property tests of the pure rules
(random and skewed scores, group and node mode, every criterion and score function, a block
bias), equality with the base rule and with plain top-k at the budget's ends through the real
router (Megatron's TopKRouter as the reference), the ramp's schedule and its resume, the bias
controller's update and checkpoint round trip, and no host sync in the router's forward."""

import pytest
import torch

from megatron_c2r.moe.router import C2RRouter, step_routers
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.routing.functional import contiguous_groups, selection_scores
from megatron_c2r.routing.rules import (
    BudgetedGroupRule,
    BudgetedNodeRule,
    NodeRule,
    SoftNodeRule,
    rule_for_config,
)
from megatron_c2r.routing.rules.budgeted import RELAX_CRITERIA, blocks_of_selection_T, relax_criterion_T
from megatron_c2r.routing.rules.soft import updated_locality_bias
from tests.megatron_cpu import moe_config
from tests.sync_audit import audit_router

E, K, G = 64, 8, 8  # node mode: D = 4 nodes of 2 groups (16 experts each)
D = 4


def _rule(mode, **options):
    layout = dict(num_nodes=D) if mode == "node" else {}
    cfg = C2RRouterConfig(mode=mode, num_groups=G, **layout, **options).resolve(num_experts=E, topk=K, ep_size=G)
    return rule_for_config(cfg, topk=K)


def _blocks(rule):
    return (D, torch.arange(E) // (E // D)) if isinstance(rule, NodeRule) else (G, torch.arange(E) // (E // G))


def _scores(kind, seed, tokens=300, score_function="softmax"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=gen)
    if kind == "skewed":  # a few experts and one node preferred by every token
        logits = logits + 3.0 * (torch.arange(E) < 20).float() + 2.0 * (torch.rand(tokens, 1, generator=gen) > 0.5)
    bias = torch.randn(E, generator=gen) * 0.1 if score_function == "sigmoid" else None
    pre = score_function == "softmax_pre"
    return selection_scores(logits, score_function="softmax" if pre else score_function,
                            use_pre_softmax=pre, expert_bias_E=bias)  # fmt: skip


def _tables(rule):
    return rule.tables(contiguous_groups(E, G), torch.zeros(E, 0, dtype=torch.int64))


@pytest.mark.parametrize("score_function", ["softmax", "softmax_pre", "sigmoid"])
@pytest.mark.parametrize("criterion", RELAX_CRITERIA)
@pytest.mark.parametrize("mode,limit,relax_to", [("node", 1, None), ("node", 1, 2), ("node", 2, None),
                                                 ("group", 1, None), ("group", 2, 4)])
def test_budgeted_rule_keeps_k_experts_the_top1_and_the_mean_budget(mode, limit, relax_to, criterion, score_function):
    key = "max_nodes" if mode == "node" else "max_groups"
    blocks = D if mode == "node" else G
    relax = relax_to or blocks
    for kind in ("random", "skewed"):
        for seed, budget in enumerate((limit, limit + 0.25, limit + 0.5, (limit + relax) / 2, relax)):
            rule = _rule(mode, **{key: limit}, mean_budget=budget, relax_to=relax_to, relax_by=criterion)
            tables = _tables(rule)
            scores = _scores(kind, seed, score_function=score_function)
            bias = torch.randn(blocks) * 0.3 if seed % 2 else None  # a group / node bias too
            idx = rule.select(scores, tables, bias)
            num, block_of_E = _blocks(rule)
            used = blocks_of_selection_T(idx, block_of_E, num)
            assert idx.shape == (scores.shape[0], K)
            assert all(len(set(row)) == K for row in idx.tolist()), "exactly k distinct experts"
            if bias is None:  # the top-1 expert is kept (with a bias the anchor block is biased)
                assert (idx == scores.argmax(dim=1, keepdim=True)).any(dim=1).all()
            assert used.max() <= relax, "every token within relax_to blocks"
            assert used.float().mean() <= budget + 1e-6, (used.float().mean(), budget)
            base = rule.limited_select(scores, tables, bias, limit)
            base_used = blocks_of_selection_T(base, block_of_E, num)
            # Relaxed: a prefix of the criterion's order (plus the tokens relaxed for free), and
            # the budget is spent: the first token left waiting would not fit (within one token).
            relaxed = rule.limited_select(scores, tables, bias, relax)
            extra = (blocks_of_selection_T(relaxed, block_of_E, num) - base_used).clamp(min=0)
            want = relax_criterion_T(criterion, scores, base, relaxed, block_of_E, num)
            is_relaxed = (idx.sort(dim=1).values == relaxed.sort(dim=1).values).all(dim=1)
            order = want.argsort(descending=True, stable=True)
            paid = (extra > 0)[order]
            waiting = paid & ~is_relaxed[order]
            if budget <= limit:  # nothing to spend beyond the base rule: its map
                assert torch.equal(idx, base)
            elif waiting.any():
                first = int(waiting.nonzero()[0])
                assert is_relaxed[order][:first][paid[:first]].all(), "relaxed in the criterion's order"
                assert not is_relaxed[order][first:][paid[first:]].any()
                # (a relaxed choice on fewer blocks than the base, possible with a block bias,
                # is counted as 0 extra: the accounting only ever overestimates the spend)
                left = budget * scores.shape[0] - base_used.sum() - extra[is_relaxed].sum()
                assert extra[order][first] > left - 1e-6, "the next token in line still fits"


def test_budgeted_rule_at_its_ends_is_the_base_rule_and_plain_topk():
    for mode, key, blocks in (("node", "max_nodes", D), ("group", "max_groups", G)):
        for seed in range(4):
            scores = _scores("random" if seed % 2 else "skewed", seed)
            low = _rule(mode, **{key: 1}, mean_budget=1.0)
            high = _rule(mode, **{key: 1}, mean_budget=float(blocks))
            base = _rule(mode, **{key: 1})
            tables = _tables(base)
            torch.testing.assert_close(low.select(scores, tables).sort(1).values, base.select(scores, tables).sort(1).values)
            top = scores.topk(K, dim=1).indices.sort(1).values
            assert torch.equal(high.select(scores, tables).sort(1).values, top)


def test_relaxation_goes_to_the_tokens_that_lose_most_score():
    rule = _rule("node", max_nodes=1, mean_budget=1.5, relax_to=2)
    tables = _tables(rule)
    scores = _scores("random", 3, tokens=400)
    idx = rule.select(scores, tables)
    base = rule.limited_select(scores, tables, None, 1)
    relaxed = rule.limited_select(scores, tables, None, 2)
    lost = scores.gather(1, relaxed).sum(1) - scores.gather(1, base).sum(1)
    chose_relaxed = (idx.sort(1).values == relaxed.sort(1).values).all(1) & (lost > 0)
    assert 0 < chose_relaxed.sum() < 400
    assert lost[chose_relaxed].min() >= lost[~chose_relaxed].max(), "relaxed: the largest losses"


@pytest.mark.usefixtures("megatron_world1")
def test_budget_ramp_anneals_from_relax_to_and_resumes_where_it_stopped():
    rule = _rule("node", max_nodes=1, mean_budget=1.5, budget_ramp_steps=100)
    assert [rule.budget_at(s) for s in (-5, 0, 50, 100, 400)] == [4.0, 4.0, 2.75, 1.5, 1.5]
    cfg = dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1, mean_budget=1.25,
               budget_ramp_steps=10, warmup_steps=5)  # fmt: skip
    router = _router(cfg)
    for iteration in range(9):
        step_routers(router, iteration)
    assert router._rule_inputs() == {"mean_budget": pytest.approx(2 - 0.75 * 4 / 10)}
    fresh = _router(cfg)
    fresh.load_state_dict(router.state_dict())
    assert fresh._rule_inputs() == router._rule_inputs(), "a resumed run continues the ramp"


def test_soft_bias_spans_plain_topk_to_the_anchored_rule():
    rule = _rule("node", max_nodes=1, locality_bias_target=1.5)
    tables = _tables(rule)
    scores = _scores("random", 4)
    top = scores.topk(K, dim=1).indices.sort(1).values
    assert torch.equal(rule.select(scores, tables, locality_bias=torch.tensor(0.0)).sort(1).values, top)
    anchored = _rule("node", max_nodes=1).select(scores, tables).sort(1).values
    assert torch.equal(rule.select(scores, tables, locality_bias=torch.tensor(1e4)).sort(1).values, anchored)
    used = [blocks_of_selection_T(rule.select(scores, tables, locality_bias=torch.tensor(d)), torch.arange(E) // 16, D)
            .float().mean() for d in (0.0, 0.5, 1.0, 2.0, 4.0)]  # fmt: skip
    assert all(a >= b for a, b in zip(used, used[1:])) and used[0] > 3 and used[-1] < 1.2


def test_locality_bias_update_is_the_sign_rule_toward_the_target():
    delta = torch.tensor(0.5)
    assert updated_locality_bias(delta, torch.tensor([300.0, 100.0]), 2.0, 0.1).item() == pytest.approx(0.6)
    assert updated_locality_bias(delta, torch.tensor([150.0, 100.0]), 2.0, 0.1).item() == pytest.approx(0.4)
    assert updated_locality_bias(delta, torch.tensor([0.0, 0.0]), 2.0, 0.1).item() == 0.5  # no tokens
    assert updated_locality_bias(torch.tensor(0.05), torch.tensor([1.0, 1.0]), 2.0, 0.1).item() == 0.0


E_R, K_R, H = 16, 4, 32  # the router tests: 16 experts top-4, 4 groups on 2 nodes


def _router(c2r, **megatron):
    router = C2RRouter(moe_config(num_moe_experts=E_R, moe_router_topk=K_R, hidden_size=H, **megatron),
                       c2r_config=C2RRouterConfig(**c2r))  # fmt: skip
    router.set_layer_number(1)
    return router.train()


@pytest.mark.usefixtures("megatron_world1")
def test_soft_bias_is_steered_in_step_routers_and_saved_in_checkpoints():
    cfg = dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1, locality_bias_target=1.2,
               locality_bias_rate=0.05, group_bias_rate=1e-3)  # fmt: skip
    router = _router(cfg)
    assert isinstance(router.rule, SoftNodeRule) and router.locality_bias.dtype == torch.float32
    x = torch.randn(64, 2, H, generator=torch.Generator().manual_seed(0))
    _, routing_map = router(x)  # delta = 0: plain top-k, about 1.9 nodes per token > 1.2
    nodes = routing_map.view(-1, 2, 8).any(dim=2).sum(dim=1).float()
    torch.testing.assert_close(router.local_locality_counts, torch.stack((nodes.sum(), torch.tensor(128.0))))
    step_routers(router, 0)  # one all-reduce with the group bias's loads
    assert router.locality_bias.item() == pytest.approx(0.05) and not router.local_locality_counts.any()
    assert router.group_bias.abs().sum() > 0
    late = []  # the sign rule settles into a +-rate oscillation around the target
    for iteration in range(1, 80):
        _, routing_map = router(x)
        late.append(routing_map.view(-1, 2, 8).any(dim=2).sum(dim=1).float().mean())
        step_routers(router, iteration)
    assert abs(torch.stack(late[-30:]).mean() - 1.2) < 0.15, (late[-30:], router.locality_bias)
    restored = _router(cfg)
    restored.load_state_dict(router.state_dict())
    assert restored.locality_bias.item() == router.locality_bias.item() > 0


@pytest.mark.usefixtures("megatron_world1")
@pytest.mark.parametrize("capacity", [None, 1.0])
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_budgeted_router_at_the_ends_equals_the_node_rule_and_megatrons_topk(score_function, capacity):
    megatron = dict(moe_router_score_function=score_function, moe_expert_capacity_factor=capacity)
    if score_function == "sigmoid":
        megatron.update(moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none")
    layout = dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1)
    x = torch.randn(40, 2, H, generator=torch.Generator().manual_seed(1))
    maps = {}
    for name, extra in (("low", dict(mean_budget=1.0)), ("base", {}), ("high", dict(mean_budget=2.0)),
                        ("topk", None)):  # fmt: skip
        torch.manual_seed(0)
        c2r = dict(mode="topk", num_groups=4, num_nodes=2) if extra is None else {**layout, **extra}
        router = _router(c2r, **megatron)
        if score_function == "sigmoid":
            router.expert_bias.copy_(torch.linspace(-0.2, 0.2, E_R))
        probs, maps[name] = router(x)
        assert torch.equal(probs > 0, maps[name]), "probs > 0 exactly on the map"
    assert torch.equal(maps["low"], maps["base"])
    assert torch.equal(maps["high"], maps["topk"]), "the whole budget: Megatron's own top-k routing"


@pytest.mark.usefixtures("megatron_world1")
def test_router_forward_makes_no_host_sync_with_a_budget_ramp_or_the_soft_bias():
    for extra in (dict(mean_budget=1.5, budget_ramp_steps=10, relax_by="best_outside"),
                  dict(locality_bias_target=1.5)):  # fmt: skip
        router = _router(dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1, group_bias_rate=1e-3, **extra))
        audit = audit_router(router, H)
        assert audit.events == [], (extra, audit.summary())


@pytest.mark.parametrize("options,match", [
    (dict(mode="node", max_nodes=1, mean_budget=0.5), r"c2r.mean_budget=0.5 must be >= 1"),
    (dict(mode="node", max_nodes=2, mean_budget=1.5), r"c2r.mean_budget=1.5 must be in \[2, 4\]"),
    (dict(mode="node", max_nodes=1, mean_budget=3.0, relax_to=2), r"c2r.mean_budget=3.0 must be in \[1, 2\]"),
    (dict(mode="node", max_nodes=2, mean_budget=2.0, relax_to=2), r"c2r.relax_to=2 must be in \(2, 4\]"),
    (dict(mode="node", max_nodes=1, relax_to=2), r"c2r.relax_to=2 applies to the budgeted rule only"),
    (dict(mode="node", max_nodes=1, mean_budget=1.5, relax_by="luck"), r"c2r.relax_by='luck' must be one of"),
    (dict(mode="topk", mean_budget=1.5), r"c2r.mean_budget=1.5 relaxes the anchored group / node rule"),
    (dict(mode="node", max_nodes=1, group_selection="group_score", locality_bias_target=1.5),
     r"c2r.locality_bias_target=1.5 relaxes the anchored"),
    (dict(mode="node", max_nodes=1, mean_budget=1.5, locality_bias_target=1.5), r"are two rules: set one"),
    (dict(mode="node", max_nodes=1, locality_bias_target=9.0), r"c2r.locality_bias_target=9.0 must be in \[1, 4\]"),
    (dict(mode="node", max_nodes=1, locality_bias_target=1.5, locality_bias_rate=0.0), r"locality_bias_rate=0.0 must be > 0"),
])  # fmt: skip
def test_bad_budget_and_bias_options_get_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as err:
        _rule(**options)
    assert "\n" not in str(err.value)


def test_rules_are_built_for_both_modes():
    assert isinstance(_rule("node", max_nodes=1, mean_budget=1.5), BudgetedNodeRule)
    assert isinstance(_rule("group", max_groups=1, mean_budget=1.5), BudgetedGroupRule)
    assert _rule("node", max_nodes=1, mean_budget=1.5).relax_to == D
    assert _rule("group", max_groups=2, mean_budget=3, relax_to=4).balance_limit == 4
