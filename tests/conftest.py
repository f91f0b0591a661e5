import inspect
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.dist_pool import DistPool  # noqa: E402


# Pools are expensive while alive, not only to start: a worker that has initialised Megatron's
# parallel state holds hundreds of gloo threads and keeps polling (measured: 4 idle workers took
# ~0.8 of a core on the 3.12 leg). So the tests that use pools run grouped by world size, after
# the others, and each pool is closed after the last test that needs its size
# (``pytest_runtest_teardown``): one pool alive at a time, each started once.
_POOLS: dict[int, DistPool] = {}
_NEEDED_AFTER: dict[str, frozenset] = {}  # nodeid -> pool sizes that later tests still need


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(n)`` -> a DistPool of n gloo processes, started once per size and closed after
    the last test that needs that size."""

    def get(world_size: int) -> DistPool:
        if world_size not in _POOLS:
            _POOLS[world_size] = DistPool(world_size)
        return _POOLS[world_size]

    yield get
    _close_pools(keep=frozenset())


def _close_pools(keep: frozenset) -> None:
    for size in [s for s in _POOLS if s not in keep]:
        _POOLS.pop(size).close()


_LITERAL_SIZE = re.compile(r"dist_pool\((\d+)\)")


def pool_sizes(item) -> tuple:
    """The pool sizes a test uses: its ``world_size(n)`` markers, ``dist_pool(<int>)`` calls in
    its source, and an ``ep`` / ``world`` parameter. Empty for tests without the fixture."""
    if "dist_pool" not in getattr(item, "fixturenames", ()):
        return ()
    sizes = {m.args[0] for m in item.iter_markers("world_size")}
    try:
        sizes |= {int(n) for n in _LITERAL_SIZE.findall(inspect.getsource(item.function))}
    except (OSError, TypeError):
        pass
    params = getattr(getattr(item, "callspec", None), "params", {})
    sizes |= {params[key] for key in ("ep", "world") if isinstance(params.get(key), int)}
    return tuple(sorted(sizes))


def pytest_runtest_teardown(item, nextitem):
    if _POOLS:
        _close_pools(keep=_NEEDED_AFTER.get(item.nodeid, frozenset(_POOLS)))


def pytest_collection_modifyitems(config, items):
    import torch

    # Tests without pools first (in their order), then pool tests grouped by their largest size.
    sizes = {item.nodeid: pool_sizes(item) for item in items}
    items.sort(key=lambda item: (max(sizes[item.nodeid], default=0),))
    needed: frozenset = frozenset()
    for item in reversed(items):
        _NEEDED_AFTER[item.nodeid] = needed
        needed = needed | frozenset(sizes[item.nodeid])

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
