import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.dist_pool import DistPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(n)`` -> a DistPool of n gloo processes, started once per session per n."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_world1():
    """This pytest process as a one-rank gloo world with Megatron's parallel state initialised
    (Megatron's aux-loss path needs process groups even at world size 1)."""
    import torch.distributed as dist

    from tests.dist_pool import _free_port
    from tests.megatron_cpu import init_parallel

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    init_parallel(ep=1)
    yield
