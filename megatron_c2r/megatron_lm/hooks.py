"""Per-iteration work for Megatron-LM's training loop: the router schedule and the metrics.

Megatron-LM's ``train()`` has no per-iteration callback, so we use two seams it owns (no
monkeypatching):

* the ``forward_step`` we pass to ``pretrain()``, wrapped: at the *first* forward of training
  iteration ``n`` (``args.curr_iteration`` = iterations completed so far) on each rank

    1. step:    ``step_routers(model, n - 1)`` per model chunk, once: ends the warm-up and
                refreshes lists (collective over stage-local groups, which every rank of a stage
                reaches at the same micro-batch).
    2. record:  the metric hooks record only iterations that will be logged
                (``(n + 1) % log_interval == 0``), so logging costs one host sync per interval.

  and after each training micro-batch forward, router statistics and dispatcher counters are
  pulled into the metrics owner. Evaluation forwards (model in eval mode) are ignored.

* ``config.finalize_model_grads_func``, the model config's documented hook that Megatron's
  schedules call once per training iteration on *every* rank of every pipeline stage, after the
  last backward and outside any pipeline send or receive (Megatron-LM's ``train()`` sets it to
  ``finalize_model_grads`` before the first iteration; we wrap whatever it holds at the first
  training forward, once). After it returns, on logged iterations:

    3. report:  reduce the metrics once over ``reduce_group`` (every rank: data-parallel ranks
                and pipeline stages, so each layer is averaged over the ranks that hold it, as
                Megatron reduces its own tracked losses) and write them to TensorBoard / W&B /
                the console / CSV on the last rank (Megatron's writers live there) under the
                iteration number Megatron logs for this step (``curr_iteration + 1``). Then reset.

  A collective over several stages cannot run inside a forward step: an earlier stage would wait
  in it for a later stage that is itself waiting for the earlier stage's activations.

If the model config has no ``finalize_model_grads_func`` (a loop other than Megatron-LM's), step 3
falls back to the first forward of the next logged iteration, reduced over ``stage_group`` only
(TP x DP x CP of this stage): with pipeline parallelism each stage then reports its own layers.

Limits: with ``--overlap-moe-expert-parallel-comm`` (schedule plans) the forward runs after
``forward_step`` returns and router metrics lag one micro-batch.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from megatron.core.utils import get_model_config

from megatron_c2r.metrics.report import C2RMetrics


class MegatronLMHooks:
    """Owns the metrics object and the router schedule for one training run.

    Args:
        get_args: Megatron's ``get_args`` (``curr_iteration``, ``log_interval``).
        step_routers: ``megatron_c2r.moe.router.step_routers``.
        reduce_group: callable returning the group reduced over after an iteration (every rank
            that calls ``finalize_model_grads``; None: no reduction).
        stage_group: callable returning this stage's TP x DP x CP group, for the fallback
            report inside ``forward_step`` (None: no reduction).
        writers: callable returning ``(tensorboard_writer, wandb_writer)`` (None on most ranks).
        csv_path: also append metrics to this CSV (last rank only); None -> ``--c2r-metrics-csv``.
    """

    def __init__(
        self,
        *,
        get_args: Callable,
        step_routers: Callable,
        reduce_group: Callable = lambda: None,
        stage_group: Callable = lambda: None,
        writers: Callable = lambda: (None, None),
        csv_path: Optional[str] = None,
    ):
        self.metrics = C2RMetrics()
        self._get_args = get_args
        self._step_routers = step_routers
        self._reduce_group = reduce_group
        self._stage_group = stage_group
        self._writers = writers
        self._csv_path = csv_path
        self._iteration: Optional[int] = None
        self._attached: set = set()
        self._stepped: dict = {}
        self._recorded = False
        self.after_iteration_hooked = False  # True once finalize_model_grads_func is wrapped

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
        """Steps 1-2 of the module docstring, and the fallback report (idempotent within an
        iteration). Wraps the model config's ``finalize_model_grads_func`` the first time."""
        args = self._get_args()
        iteration = int(args.curr_iteration)
        log_interval = _log_interval(args)
        if id(model) not in self._attached:
            self.metrics.attach(model)
            self._attached.add(id(model))
            self.hook_after_iteration(get_model_config(model))
        if iteration != self._iteration:
            fallback = not self.after_iteration_hooked
            if fallback and self._recorded and iteration % log_interval == 0:
                self.report(iteration, group=self._stage_group())
            self._iteration = iteration
            self.metrics.recording = (iteration + 1) % log_interval == 0
        if iteration > 0 and self._stepped.get(id(model)) != iteration:
            self._step_routers(model, iteration - 1)
            self._stepped[id(model)] = iteration

    def hook_after_iteration(self, config) -> bool:
        """Wrap ``config.finalize_model_grads_func`` so :meth:`after_iteration` runs after it
        (once per config; a config without one is left alone). Returns whether it is hooked."""
        original = getattr(config, "finalize_model_grads_func", None)
        if original is None:
            return self.after_iteration_hooked
        if getattr(original, "c2r_hooks", None) is not self:

            @functools.wraps(original)
            def c2r_finalize_model_grads(*args, **kwargs):
                result = original(*args, **kwargs)
                self.after_iteration()
                return result

            c2r_finalize_model_grads.c2r_hooks = self
            config.finalize_model_grads_func = c2r_finalize_model_grads
        self.after_iteration_hooked = True
        return True

    def after_iteration(self) -> Optional[dict]:
        """Step 3: on an iteration that is logged, reduce over ``reduce_group``, write, reset.

        Called on every rank once per training iteration (after ``finalize_model_grads``). The
        decision depends on the iteration only, so every rank of the group joins the one
        collective, also a stage without MoE layers. Returns the values (None if not logged).
        """
        args = self._get_args()
        iteration = int(args.curr_iteration)
        if (iteration + 1) % _log_interval(args) != 0:
            return None
        values = self.report(iteration + 1, group=self._reduce_group())
        self.metrics.recording = False  # a rerun of this iteration's forwards is not logged twice
        return values

    def report(self, iteration: int, group=None) -> dict:
        """Reduce over ``group``, write and reset (every rank of ``group`` calls it together)."""
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
            group=group,
        )
        self.metrics.reset()
        self._recorded = False
        return values


def _log_interval(args) -> int:
    return max(int(getattr(args, "log_interval", 1) or 1), 1)


def megatron_lm_hooks(csv_path: Optional[str] = None) -> MegatronLMHooks:
    """Hooks wired to Megatron-LM's globals (call after ``megatron.training`` is importable)."""
    from megatron.core import parallel_state
    from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer

    from megatron_c2r.moe.router import step_routers

    def stage_group():
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)

    return MegatronLMHooks(
        get_args=get_args,
        step_routers=step_routers,
        reduce_group=lambda: torch.distributed.group.WORLD,  # every rank calls finalize
        stage_group=stage_group,
        writers=lambda: (get_tensorboard_writer(), get_wandb_writer()),
        csv_path=csv_path,
    )
