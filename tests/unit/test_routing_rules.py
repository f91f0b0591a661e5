"""Property tests of the pure routing rules (many random seeds, every token checked)."""

import pytest
import torch

from megatron_c2r.collaboration import coactivation_counts, top_t_lists
from megatron_c2r.routing.functional import (
    c2r_topk,
    group_topk,
    groups_per_token,
    probs_from_selection,
    validate_groups,
    validate_top_t_lists,
)
from megatron_c2r.routing.penalty import collaboration_penalty

SHAPES = [(8, 2, 5), (16, 4, 3), (16, 4, 15), (64, 8, 12), (60, 4, 30)]  # E, k, T


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
    groups = dict(expert_to_group_E=torch.tensor([0, 0, 1, 1]), num_groups=2)
    p = collaboration_penalty(logits, **groups)
    assert torch.allclose(p, torch.tensor((0.3 + 0.2) / 2))
    padding = torch.tensor([False, True])
    assert torch.allclose(collaboration_penalty(logits, padding_mask_T=padding, **groups), torch.tensor(0.3))
    lists = torch.tensor([[2], [0], [1], [2]])  # c2r: allowed = {anchor} U list(anchor)
    assert torch.allclose(collaboration_penalty(logits, top_t_lists_EL=lists), torch.tensor((0.3 + 0.2) / 2))


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
        (torch.tensor([0, 0, 1, 1, 2, 2]), 4, 2, 1, "num_groups=4 must divide num_experts=6"),
        (torch.tensor([0, 0, 0, 1]), 2, 2, 1, "not a balanced partition"),
        (torch.tensor([0, 0, 1, 1]), 2, 2, 3, r"max_groups=3 must be in \[1, num_groups=2\]"),
        (torch.tensor([0, 0, 1, 1]), 2, 3, 1, "topk=3 exceeds the 1 group"),
    ],
)
def test_bad_groups_get_one_line_errors_naming_the_problem(e2g, groups, k, m, match):
    with pytest.raises(ValueError, match=match):
        validate_groups(e2g, groups, k, m)
