"""The collaboration tracker sums co-activation over data-parallel ranks (2 gloo processes)."""

import pytest
import torch
import torch.distributed as dist

from megatron_c2r.collaboration import CollaborationTracker, coactivation_counts


def _rank_routing(rank, tokens=64, experts=8, k=2):
    gen = torch.Generator().manual_seed(100 + rank)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, idx, True)


def _record_and_reduce():
    rank = dist.get_rank()
    tracker = CollaborationTracker(8)
    tracker.record(_rank_routing(rank))
    tracker.record(_rank_routing(rank + 10))
    tracker.reduce_()
    after_first = tracker.counts.clone()
    tracker.reduce_()  # nothing pending: counts must not double
    return after_first, tracker.counts.clone(), int(tracker.tokens)


@pytest.mark.world_size(2)
def test_tracker_counts_sum_over_data_parallel_ranks_exactly_once(dist_pool):
    results = dist_pool(2).run(_record_and_reduce)
    expected = sum(
        coactivation_counts(_rank_routing(r)) + coactivation_counts(_rank_routing(r + 10))
        for r in range(2)
    )
    for first, second, tokens in results:
        assert torch.equal(first, expected)
        assert torch.equal(second, expected)
        assert tokens == 4 * 64
