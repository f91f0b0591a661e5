"""A session-scoped pool of gloo worker processes for multi-process tests.

Importing megatron.core costs ~5 s per process and CI has 2 cores, so tests must not spawn fresh
processes per case. A ``DistPool(world_size)`` starts ``world_size`` processes once, each joins one
gloo ``torch.distributed`` world and imports megatron.core; ``pool.run(fn, *args)`` then runs the
module-level function ``fn(*args)`` on every rank at the same time and returns the per-rank results
(rank order). Inside ``fn`` use ``torch.distributed.get_rank()``.

A rank that raises makes the others hang in their next collective, so the pool gives the remaining
ranks a short grace period, then kills the whole pool and re-raises the first traceback; the next
``run`` starts a fresh pool.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT_S = float(os.environ.get("C2R_TEST_DIST_TIMEOUT", "300"))
_GRACE_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # world_size processes share 2 cores in CI
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import megatron.core  # noqa: F401  (pay the import once per worker)

    results.put(("ready", rank, True, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, module_name, fn_name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            out = fn(*args, **kwargs)
            results.put((task_id, rank, True, out))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._task_id = 0
        self._start()

    def _start(self, attempts: int = 3) -> None:
        # The free port is released before rank 0's TCPStore binds it, so another process on the
        # machine can take it in between (EADDRINUSE, the workers die): start again on a new port.
        for attempt in range(attempts):
            try:
                return self._spawn(_free_port())
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def _spawn(self, port: int) -> None:
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", timeout=DEFAULT_TIMEOUT_S)

    def _collect(self, task_id, timeout: float) -> list:
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        failure = None
        while len(out) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                tid, rank, ok, value = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs):
                    failure = failure or "a worker process died (see stderr above)"
                    break
                continue
            if tid != task_id:
                continue
            if not ok and failure is None:
                failure = f"rank {rank} raised:\n{value}"
                deadline = min(deadline, time.monotonic() + _GRACE_S)
            out[rank] = value
        if failure is not None or len(out) < self.world_size:
            self.close()
            missing = sorted(set(range(self.world_size)) - set(out))
            raise RuntimeError(failure or f"ranks {missing} timed out after {timeout:.0f} s")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        if not self._procs:
            self._start()
        module_name = fn.__module__
        if module_name == "__main__":
            raise ValueError("DistPool.run needs a function importable by module name")
        self._task_id += 1
        for q in self._tasks:
            q.put((self._task_id, module_name, fn.__name__, args, kwargs))
        return self._collect(self._task_id, timeout)

    def close(self, grace_s: float = 2.0) -> None:
        """Ask every worker to leave, give them ``grace_s`` seconds together (not each: a
        worker tearing down many gloo groups can take long, and nothing it does then matters),
        then kill what is left."""
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001
                    pass
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []


def ensure_repo_on_path() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
