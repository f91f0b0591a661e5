"""Property tests of the pure routing rules (many random seeds, every token checked)."""

import functools

import pytest
import torch

from megatron_c2r.collaboration import coactivation_counts, top_t_lists
from megatron_c2r.routing.config import GROUP_SELECTIONS, MODES
from megatron_c2r.routing.functional import (
    c2r_topk,
    expert_scores,
    group_topk,
    groups_from_expert_to_group,
    groups_per_token,
    node_topk,
    probs_from_selection,
    selection_scores,
    validate_groups,
    validate_top_t_lists,
)
from megatron_c2r.routing.moge import group_balanced_topk
from megatron_c2r.routing.penalty import collaboration_penalty, full_scores, mass_in_group, mass_in_top_t
from megatron_c2r.routing.rules import RULES, build_rule

SHAPES = [(8, 2, 5), (16, 4, 3), (16, 4, 15), (64, 8, 12), (60, 4, 30)]  # E, k, top_t


def random_lists(num_experts, top_t, gen):
    rows = []
    for e in range(num_experts):
        others = torch.tensor([j for j in range(num_experts) if j != e])
        rows.append(others[torch.randperm(num_experts - 1, generator=gen)[:top_t]])
    return torch.stack(rows)


@pytest.mark.parametrize("num_experts,topk,top_t", SHAPES)
def test_tokens_never_leave_the_top_t_list_of_their_top1_expert(num_experts, topk, top_t):
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        lists = random_lists(num_experts, top_t, gen)
        scores = torch.randn(257, num_experts, generator=gen)
        values, idx = c2r_topk(scores, topk, lists)
        assert torch.equal(idx[:, 0], scores.argmax(dim=-1)), "top-1 must be unconstrained"
        for t in range(scores.shape[0]):
            assert set(idx[t, 1:].tolist()) <= set(lists[idx[t, 0]].tolist())
            assert len(set(idx[t].tolist())) == topk
        # The rest are the best-scoring members of the list.
        best_rest = scores.gather(1, lists[idx[:, 0]]).topk(topk - 1, dim=1).values
        assert torch.allclose(values[:, 1:], best_rest)


def test_c2r_with_the_full_list_is_plain_topk():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 16, generator=gen)
    lists = top_t_lists(torch.ones(16, 16, dtype=torch.int64), 15)
    _, idx = c2r_topk(scores, 4, lists)
    assert torch.equal(idx.sort(1).values, scores.topk(4, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("anchored", [True, False])
@pytest.mark.parametrize("num_experts,topk,groups,max_groups", [(16, 4, 4, 1), (16, 4, 4, 2), (64, 8, 8, 2), (64, 8, 8, 1), (8, 2, 2, 2)])
def test_group_mode_keeps_every_token_within_max_groups(num_experts, topk, groups, max_groups, anchored):
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        expert_to_group = torch.randperm(num_experts, generator=gen) % groups  # any balanced partition
        scores = torch.randn(300, num_experts, generator=gen)
        _, idx = group_topk(scores, topk, expert_to_group, groups, max_groups, anchored=anchored)
        used = expert_to_group[idx]
        for t in range(scores.shape[0]):
            assert len(set(used[t].tolist())) <= max_groups
            assert len(set(idx[t].tolist())) == topk
        if anchored:  # the top-1 expert is always kept
            assert torch.equal(idx[:, 0], scores.argmax(dim=-1))


def test_group_score_rule_matches_megatron_group_limited_topk_on_contiguous_groups():
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(400, 64, generator=gen)
    contiguous = torch.arange(64) // 8
    ours_v, ours_i = group_topk(scores, 8, contiguous, 8, 2, anchored=False)
    ref_v, ref_i = group_limited_topk(scores, 8, 400, 64, 8, 2)
    assert torch.equal(ours_i, ref_i) and torch.equal(ours_v, ref_v)


def test_groups_per_token_counts_distinct_groups_of_each_token_like_a_brute_force_count():
    gen = torch.Generator().manual_seed(8)
    for num_experts, groups, k in [(16, 4, 4), (64, 8, 8), (8, 8, 3)]:
        e2g = torch.randperm(num_experts, generator=gen) % groups
        idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(100)])
        routing_map = torch.zeros(100, num_experts, dtype=torch.bool).scatter_(1, idx, True)
        routing_map[7] = False  # a dropped token uses no group
        expected = torch.tensor([len(set(e2g[routing_map[t]].tolist())) for t in range(100)])
        got = groups_per_token(routing_map, e2g, groups)
        assert got.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize("score_function,pre", [("softmax", False), ("softmax", True), ("sigmoid", False)])
def test_probs_are_zero_off_the_routing_map_and_exactly_k_experts_are_used(score_function, pre):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(128, 16, generator=gen)
    _, idx = group_topk(logits, 4, torch.arange(16) // 4, 4, 1)
    probs, routing_map = probs_from_selection(
        logits, idx, score_function=score_function, use_pre_softmax=pre, scaling_factor=None
    )
    assert torch.all(routing_map.sum(dim=1) == 4)
    assert torch.all(probs[~routing_map] == 0)
    assert torch.all(probs[routing_map] > 0)


def test_coactivation_counts_equal_a_brute_force_count_and_ignore_padding():
    gen = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(12, generator=gen)[:3] for _ in range(200)])
    routing_map = torch.zeros(200, 12, dtype=torch.bool).scatter_(1, idx, True)
    padding = torch.rand(200, generator=gen) < 0.25
    expected = torch.zeros(12, 12, dtype=torch.int64)
    for t in range(200):
        if padding[t]:
            continue
        for i in idx[t].tolist():
            for j in idx[t].tolist():
                if i != j:
                    expected[i, j] += 1
    assert torch.equal(coactivation_counts(routing_map, padding), expected)


def test_top_t_lists_rank_partners_by_count_and_break_ties_by_id():
    counts = torch.tensor([[0, 5, 5, 1], [5, 0, 2, 9], [5, 2, 0, 0], [1, 9, 0, 0]])
    assert top_t_lists(counts, 2).tolist() == [[1, 2], [3, 0], [0, 1], [1, 0]]


def test_penalty_is_the_mass_outside_the_anchor_group():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]]))
    in_group = functools.partial(mass_in_group, expert_to_group_E=torch.tensor([0, 0, 1, 1]), num_groups=2)
    p = collaboration_penalty(logits, in_group)
    assert torch.allclose(p, torch.tensor((0.3 + 0.2) / 2))
    padding = torch.tensor([False, True])
    assert torch.allclose(collaboration_penalty(logits, in_group, padding_mask_T=padding), torch.tensor(0.3))
    lists = torch.tensor([[2], [0], [1], [2]])  # c2r: allowed = {anchor} U list(anchor)
    in_list = functools.partial(mass_in_top_t, top_t_lists_EL=lists)
    assert torch.allclose(collaboration_penalty(logits, in_list), torch.tensor((0.3 + 0.2) / 2))


@pytest.mark.parametrize(
    "lists,match",
    [
        (torch.tensor([[1], [0], [3]]), r"shape \(3, 1\), expected \[num_experts=4"),
        (torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1]]), r"top_t_lists\[0\] contains expert 0 itself"),
        (torch.tensor([[1, 1], [0, 2], [0, 1], [0, 1]]), r"top_t_lists\[0\] = \[1, 1\] has duplicate"),
        (torch.tensor([[1, 9], [0, 2], [0, 1], [0, 1]]), r"expert id 9 outside \[0, 3\]"),
        (torch.tensor([[1], [0], [0], [0]]), r"top_t=1 must satisfy topk-1=2"),
    ],
)
def test_bad_top_t_lists_get_one_line_errors_naming_the_problem(lists, match):
    with pytest.raises(ValueError, match=match) as err:
        validate_top_t_lists(lists, num_experts=4, topk=3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "e2g,groups,k,m,match",
    [
        (torch.tensor([0, 0, 1, 1, 2, 2]), 4, 2, 1, "num_experts=6 must be divisible by num_groups=4"),
        (torch.tensor([0, 0, 0, 1]), 2, 2, 1, "not a balanced partition"),
        (torch.tensor([0, 0, 1, 1]), 2, 2, 3, r"max_groups=3 must be in \[1, num_groups=2\]"),
        (torch.tensor([0, 0, 1, 1]), 2, 3, 1, "topk=3 exceeds the 1 group"),
    ],
)
def test_bad_groups_get_one_line_errors_naming_the_problem(e2g, groups, k, m, match):
    with pytest.raises(ValueError, match=match):
        validate_groups(e2g, groups, k, m)


def test_every_configurable_mode_has_exactly_one_rule_whose_selection_is_the_pure_function():
    gen = torch.Generator().manual_seed(21)
    e2g = torch.randperm(16, generator=gen) % 4
    lists = random_lists(16, 5, gen)
    scores = torch.randn(200, 16, generator=gen)
    groups_GN = groups_from_expert_to_group(e2g, 4)
    expected = {
        "topk": scores.topk(4, dim=1).indices,
        "c2r": c2r_topk(scores, 4, lists)[1],
        "group/anchored": group_topk(scores, 4, e2g, 4, 2, anchored=True)[1],
        "group/group_score": group_topk(scores, 4, e2g, 4, 2, anchored=False)[1],
        "node/anchored": node_topk(scores, 4, groups_GN, 2, 1, anchored=True, max_ranks_per_node=1)[1],
        "node/group_score": node_topk(scores, 4, groups_GN, 2, 1, anchored=False, max_ranks_per_node=1)[1],
        "group_balanced": group_balanced_topk(scores, 4, groups_GN)[1],
    }
    built = {}
    node_options = dict(num_nodes=2, max_nodes=1, max_ranks_per_node=1)
    for mode in MODES:
        for selection in GROUP_SELECTIONS:
            options = node_options if mode == "node" else {}
            rule = build_rule(mode, selection, topk=4, num_groups=4, max_groups=2, **options)
            assert rule.mode == mode
            key = f"{mode}/{selection}" if mode in ("group", "node") else mode
            built.setdefault(key, type(rule))
            assert built[key] is type(rule), "group_selection must not change a non-group rule"
            got = rule.select(scores, rule.tables(e2g, lists))
            assert torch.equal(got, expected[key]), key
    assert len(set(built.values())) == len(RULES) == len(expected)
    with pytest.raises(ValueError, match=r"c2r.mode='nodes' .* has no routing rule"):
        build_rule("nodes", None, topk=4, num_groups=4, max_groups=1)


def test_rule_statistics_and_penalty_match_a_brute_force_oracle():
    gen = torch.Generator().manual_seed(22)
    e2g = torch.randperm(16, generator=gen) % 4
    lists = random_lists(16, 3, gen)
    logits = torch.randn(300, 16, generator=gen)
    probs = torch.softmax(logits, dim=1)
    idx = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(300)])
    routing_map = torch.zeros(300, 16, dtype=torch.bool).scatter_(1, idx, True)
    groups_T = groups_per_token(routing_map, e2g, 4).float()
    anchor = probs.argmax(dim=1)
    outside_list = torch.tensor([
        bool(set(routing_map[t].nonzero().flatten().tolist()) - {int(anchor[t])} - set(lists[anchor[t]].tolist()))
        for t in range(300)
    ])
    for mode, selection, max_groups, active, expected in [
        ("topk", None, 2, True, groups_T > 1),           # the 1-group reference
        ("group", "anchored", 2, True, groups_T > 2),
        ("group", "group_score", 3, False, groups_T > 3),
        ("c2r", None, 1, False, groups_T > 1),           # warm-up: no lists yet
        ("c2r", None, 1, True, outside_list),
    ]:
        rule = build_rule(mode, selection, topk=4, num_groups=4, max_groups=max_groups)
        tables = rule.tables(e2g, lists)
        assert torch.equal(rule.violated_T(probs, routing_map, groups_T, tables, active), expected), mode
    # Penalty: each rule's allowed set, against the pure function.
    in_group = functools.partial(mass_in_group, expert_to_group_E=e2g, num_groups=4)
    in_list = functools.partial(mass_in_top_t, top_t_lists_EL=lists)
    for mode, selection, inside in [("topk", None, in_group), ("group", "anchored", in_group), ("c2r", None, in_list)]:
        rule = build_rule(mode, selection, topk=4, num_groups=4, max_groups=1)
        got = rule.penalty(logits, rule.tables(e2g, lists), score_function="softmax", padding_mask_T=None)
        assert torch.equal(got, collaboration_penalty(logits, inside)), mode
    c2r = build_rule("c2r", None, topk=4, num_groups=4, max_groups=1)
    assert not c2r.penalty_applies(False) and c2r.penalty_applies(True)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_score_functions_have_one_source_and_bad_names_get_one_line_errors(score_function):
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    ref = torch.softmax(logits.float(), dim=-1) if score_function == "softmax" else torch.sigmoid(logits.float())
    assert torch.equal(expert_scores(logits, score_function, keep_fp32=True), ref)
    assert torch.equal(expert_scores(logits, score_function), ref.to(torch.bfloat16))
    full = full_scores(logits, score_function)
    torch.testing.assert_close(full.sum(dim=1), torch.ones(32))
    for bad in (lambda: expert_scores(logits, "relu"), lambda: full_scores(logits, "relu"),
                lambda: selection_scores(logits, score_function="relu", use_pre_softmax=True, expert_bias_E=None),
                lambda: probs_from_selection(logits, logits.topk(2).indices, score_function="relu",
                                             use_pre_softmax=False, scaling_factor=None)):
        with pytest.raises(ValueError, match=r"^moe_router_score_function='relu' must be one of softmax, sigmoid$"):
            bad()
