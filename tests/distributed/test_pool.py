"""The multi-process harness itself: ranks see one gloo world, failures surface, pools recover."""

import pytest
import torch
import torch.distributed as dist


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return dist.get_rank()


@pytest.mark.world_size(2)
def test_every_rank_runs_the_task_in_one_gloo_world(dist_pool):
    results = dist_pool(2).run(_rank_and_sum)
    assert results == [(0, 2, 3.0), (1, 2, 3.0)]


@pytest.mark.world_size(2)
def test_a_failing_rank_raises_its_traceback_and_the_pool_restarts(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        pool.run(_raise_on_rank_one)
    assert pool.run(_rank_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]
