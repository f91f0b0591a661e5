"""Per-iteration work for Megatron-LM's training loop, driven from ``forward_step``.

Megatron-LM's ``train()`` has no per-iteration callback, so we wrap the ``forward_step`` we pass to
``pretrain()`` (no monkeypatching). On each rank, at the *first* forward of training iteration
``n`` (``args.curr_iteration`` = iterations completed so far):

    1. report:  if ``n % log_interval == 0`` and metrics were recorded during iteration ``n-1``,
                average them over this pipeline stage's ranks (TP x DP x CP: a collective that
                cannot deadlock against pipeline sends, since every rank of a stage reaches this
                point for the same micro-batch) and write them to TensorBoard / W&B / the console
                / CSV on the last rank (Megatron's writers live there), under the same iteration
                number Megatron logs. Then reset.
    2. step:    ``step_routers(model, n - 1)`` per model chunk, once: ends the warm-up and
                refreshes lists (collective over the same stage-local groups).
    3. record:  the metric hooks record only iterations that will be logged
                (``(n + 1) % log_interval == 0``), so logging costs one host sync per interval.

After each training micro-batch forward, router ``c2r_metrics()`` and dispatcher counters are
pulled into the owner. Evaluation forwards (model in eval mode) are ignored.

Limits: with pipeline parallelism the last rank sees only the last stage's layers, so TensorBoard
and W&B carry those; with ``--overlap-moe-expert-parallel-comm`` (schedule plans) the forward runs
after ``forward_step`` returns and router metrics lag one micro-batch.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from megatron_c2r.metrics import C2RMetrics


class MegatronLMHooks:
    """Owns the metrics object and the router schedule for one training run.

    Args:
        get_args: Megatron's ``get_args`` (``curr_iteration``, ``log_interval``).
        csv_path: also append metrics to this CSV (last rank only); None -> ``--c2r-metrics-csv``.
        step_routers: ``megatron_c2r.moe.router.step_routers``.
        reduce_group: callable returning the stage-local group (None: no reduction).
        writers: callable returning ``(tensorboard_writer, wandb_writer)`` (None on most ranks).
    """

    def __init__(
        self,
        *,
        get_args: Callable,
        step_routers: Callable,
        reduce_group: Callable = lambda: None,
        writers: Callable = lambda: (None, None),
        csv_path: Optional[str] = None,
    ):
        self.metrics = C2RMetrics()
        self._get_args = get_args
        self._step_routers = step_routers
        self._reduce_group = reduce_group
        self._writers = writers
        self._csv_path = csv_path
        self._iteration: Optional[int] = None
        self._attached: set = set()
        self._stepped: dict = {}
        self._recorded = False

    def wrap_forward_step(self, forward_step: Callable) -> Callable:
        """``forward_step(data_iterator, model, ...)`` with our per-iteration work around it."""

        @functools.wraps(forward_step)
        def c2r_forward_step(data_iterator, model, *args, **kwargs):
            training = model.training
            if training:
                self.before_forward(model)
            result = forward_step(data_iterator, model, *args, **kwargs)
            if training and self.metrics.recording:
                self.metrics.record(model)
                self._recorded = True
            return result

        return c2r_forward_step

    def before_forward(self, model) -> None:
        """Steps 1-3 of the module docstring (idempotent within an iteration)."""
        args = self._get_args()
        iteration = int(args.curr_iteration)
        log_interval = max(int(getattr(args, "log_interval", 1) or 1), 1)
        if id(model) not in self._attached:
            self.metrics.attach(model)
            self._attached.add(id(model))
        if iteration != self._iteration:
            if self._recorded and iteration % log_interval == 0:
                self.report(iteration)
            self._iteration = iteration
            self.metrics.recording = (iteration + 1) % log_interval == 0
        if iteration > 0 and self._stepped.get(id(model)) != iteration:
            self._step_routers(model, iteration - 1)
            self._stepped[id(model)] = iteration

    def report(self, iteration: int) -> dict:
        """Reduce, write and reset (every rank of the stage calls this at the same point)."""
        tb_writer, wandb_writer = self._writers()
        is_last = not torch.distributed.is_initialized() or (
            torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        )
        csv_path = self._csv_path or getattr(self._get_args(), "c2r_metrics_csv", None)
        values = self.metrics.report(
            iteration,
            tb_writer=tb_writer,
            wandb_run=wandb_writer,
            csv_path=csv_path if is_last else None,
            print_fn=(lambda line: print(line, flush=True)) if is_last else None,
            group=self._reduce_group(),
        )
        self.metrics.reset()
        self._recorded = False
        return values


def megatron_lm_hooks(csv_path: Optional[str] = None) -> MegatronLMHooks:
    """Hooks wired to Megatron-LM's globals (call after ``megatron.training`` is importable)."""
    from megatron.core import parallel_state
    from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer

    from megatron_c2r.moe.router import step_routers

    def reduce_group():
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)

    return MegatronLMHooks(
        get_args=get_args,
        step_routers=step_routers,
        reduce_group=reduce_group,
        writers=lambda: (get_tensorboard_writer(), get_wandb_writer()),
        csv_path=csv_path,
    )
