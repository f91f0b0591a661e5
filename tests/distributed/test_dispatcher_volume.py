"""Rows the dedup dispatcher actually ships over real gloo all-to-alls, and the autograd
all-to-all wrapper underneath it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_c2r.comm import all_to_all_single, expected_ranks_per_token_uniform
from megatron_c2r.comm.all_to_all import reference_all_to_all
from tests.distributed.test_dispatcher_equivalence import build_layer


def _dispatch_volume(ep, E, k, tokens, routing):
    """Dispatch (no experts) ``tokens`` tokens per rank; return the group totals of the counters."""
    layer = build_layer("dedup", ep, num_moe_experts=E, moe_router_topk=k)
    dispatcher = layer.token_dispatcher
    L, rank = E // ep, dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    scores = torch.rand(tokens, E, generator=g)
    if routing == "uniform":
        chosen = scores.topk(k, dim=1).indices
    else:  # group M=1: one rank's block per token, top-k inside it
        block = torch.randint(0, ep, (tokens, 1), generator=g)
        chosen = scores.view(tokens, ep, L)[torch.arange(tokens), block[:, 0]].topk(k, dim=1)
        chosen = chosen.indices + block * L
    routing_map = torch.zeros(tokens, E, dtype=torch.bool).scatter(1, chosen, True)
    x = torch.randn(tokens, 1, 16)
    x_QH, _ = dispatcher.token_dispatch(
        *dispatcher.dispatch_preprocess(x, routing_map, routing_map.float())
    )
    s = dispatcher.last_stats
    totals = torch.tensor(
        [s.rows_dispatched, s.routed_tokens, s.megatron_rows_dispatched, x_QH.shape[0],
         s.rows_combined, s.rows_dispatched_remote, s.rows_combined_remote],
        dtype=torch.float64,
    )  # fmt: skip
    dist.all_reduce(totals)
    return totals.tolist()


@pytest.mark.world_size(4)
def test_uniform_routing_ships_the_formulas_ranks_per_token_within_two_percent(dist_pool):
    E, k, P, T = 16, 4, 4, 1500
    rows, routed, megatron_rows, received, combined, remote, combined_remote = dist_pool(4).run(
        _dispatch_volume, P, E, k, T, "uniform"
    )[0]
    assert rows / routed == pytest.approx(expected_ranks_per_token_uniform(E, k, P), rel=0.02)
    assert expected_ranks_per_token_uniform(E, k, P) == pytest.approx(2.91, abs=0.01)
    assert megatron_rows == k * P * T
    assert received == combined == rows  # every row dispatched is received and sent back once
    assert remote == combined_remote


@pytest.mark.world_size(4)
def test_group_routing_with_one_rank_per_token_ships_exactly_one_row_per_token(dist_pool):
    E, k, P, T = 16, 4, 4, 500
    rows, routed, megatron_rows, *_ = dist_pool(4).run(_dispatch_volume, P, E, k, T, "group")[0]
    assert rows == routed == P * T
    assert megatron_rows == k * rows


def _all_to_all_matches_reference():
    rank, world = dist.get_rank(), dist.get_world_size()
    # Rank r sends (r + d) % 3 rows to rank d (some zero): uneven splits, empty chunks.
    splits = [[(r + d) % 3 for d in range(world)] for r in range(world)]
    inputs = [
        torch.arange(sum(s) * 2, dtype=torch.float64).view(-1, 2) + 100 * r
        for r, s in enumerate(splits)
    ]
    expected = reference_all_to_all(inputs, splits)[rank]
    x = inputs[rank].clone().requires_grad_()
    out = all_to_all_single(x, [splits[src][rank] for src in range(world)], splits[rank])
    weight = torch.arange(out.numel(), dtype=torch.float64).view_as(out)
    (out * weight).sum().backward()
    # The gradient of row i of x is the weight its copy met on the destination rank.
    weights = [
        torch.arange(sum(splits[s][d] for s in range(world)) * 2, dtype=torch.float64).view(-1, 2)
        for d in range(world)
    ]
    back_splits = [[splits[s][d] for s in range(world)] for d in range(world)]
    expected_grad = reference_all_to_all(weights, back_splits)[rank]
    bad_split = None
    try:
        all_to_all_single(x, [0] * world, [x.shape[0] + 1] + [0] * (world - 1))
    except ValueError as e:
        bad_split = str(e)
    return (
        torch.equal(out, expected),
        torch.equal(x.grad, expected_grad),
        out.device == x.device,
        bad_split,
    )


@pytest.mark.world_size(4)
def test_the_autograd_all_to_all_matches_the_reference_and_swaps_splits_in_backward(dist_pool):
    for same_out, same_grad, same_device, bad_split in dist_pool(4).run(
        _all_to_all_matches_reference
    ):
        assert same_out and same_grad and same_device
        assert "input_splits sums to" in bad_split and "rows" in bad_split
