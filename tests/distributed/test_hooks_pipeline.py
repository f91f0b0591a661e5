"""The Megatron-LM hooks under Megatron's real 1F1B pipeline schedule on 4 gloo processes
(2 pipeline stages x 2 data-parallel ranks, EP 2 inside each stage): the metrics are reduced
once per logged iteration *after* it, in the model config's ``finalize_model_grads_func``, which
every stage reaches independently of pipeline sends, over every rank (DP and PP). Each layer's
reduced value equals the mean, over the ranks holding it, of what those ranks recorded alone.

``finalize_model_grads_func`` stands in for Megatron's ``finalize_model_grads`` (which needs DDP
grad buffers): it records its calls, so the test also checks the original runs once per
iteration and before our report.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.megatron_cpu import megatron_cpu, moe_config

H, S, MB, ITERATIONS, LOG_INTERVAL = 16, 6, 2, 4, 2


class Stage(torch.nn.Module):
    """One pipeline stage as Megatron's schedules expect it: ``config``, ``model_type``,
    ``set_input_tensor`` (the previous stage's activations on later stages) and a forward over
    one MoE layer."""

    def __init__(self, layer, config):
        from megatron.core.enums import ModelType

        super().__init__()
        self.layer, self.config, self.input_tensor = layer, config, None
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, x):
        out, _ = self.layer(x if self.input_tensor is None else self.input_tensor)
        return out


@contextlib.contextmanager
def cpu_schedules():
    """Megatron's schedules on CPU: ``megatron_cpu()`` (p2p buffers on
    ``torch.cuda.current_device()``) plus the schedules' one literal ``device="cuda"``
    allocation (their token counter) placed on the CPU. Starts from a fresh process's aux-loss
    scale: an aux-loss backward outside the schedules (an earlier test in this process) leaves
    Megatron's class-level scale 0-d, and the schedules' [1]-shaped ``set_loss_scale`` cannot
    copy into it. Test-only, like ``megatron_cpu``."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    zeros = torch.zeros

    def cpu_zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return zeros(*args, **kwargs)

    with megatron_cpu(), mock.patch.object(torch, "zeros", cpu_zeros), mock.patch.object(
        MoEAuxLossAutoScaler, "main_loss_backward_scale", None
    ):
        yield


def build_stage(layer_number: int, options, **config_overrides):
    """A Stage holding one C2R MoE layer (global layer ``layer_number``) built from our block
    spec; its config counts as a model of ``num_layers`` = 2 layers for the metrics table."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    config = moe_config(
        num_layers=2, hidden_size=H, num_moe_experts=4, moe_router_topk=2,
        pipeline_dtype=torch.float32, batch_p2p_comm=False, **config_overrides,
    )  # fmt: skip
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    spec = block.layer_specs[0].submodules.mlp
    layer = build_from_spec(spec, config=config, layer_number=layer_number)
    layer.set_layer_number(layer_number)
    return Stage(layer, config).train()


def forward_step_for(stage, hooks, on_forward=lambda: None):
    """A ``forward_step(data_iterator, model)`` as pretrain_gpt's, wrapped by ``hooks``."""

    def forward_step(data_iterator, model):
        on_forward()
        out = model(next(data_iterator))

        def loss_func(output):
            loss = output.float().pow(2).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    return hooks.wrap_forward_step(forward_step)


def run_iterations(schedule, stage, step, args, iterations, micro_batches=MB, seed=0):
    """``iterations`` training iterations of Megatron's ``schedule`` over random ``[S, 1,
    hidden]`` micro-batches, with Megatron-LM's ``args.curr_iteration`` bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    hidden = stage.config.hidden_size
    for iteration in range(iterations):
        args.curr_iteration = iteration
        data = iter([torch.randn(S, 1, hidden, generator=g) for _ in range(micro_batches)])
        schedule(
            forward_step_func=step, data_iterator=data, model=[stage],
            num_microbatches=micro_batches, seq_length=S, micro_batch_size=1,
        )  # fmt: skip


def _two_stages_two_dp_ranks():
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving as one_f_one_b,
    )

    from megatron_c2r.megatron_lm.hooks import MegatronLMHooks
    from megatron_c2r.metrics.report import C2RMetrics
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.router import step_routers
    from megatron_c2r.routing.config import C2RRouterConfig

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        pipeline_model_parallel_size=2, expert_model_parallel_size=2,
        create_gloo_process_groups=False,
    )
    try:
        stage_index = ps.get_pipeline_model_parallel_rank()
        torch.manual_seed(stage_index)
        options = C2ROptions(router=C2RRouterConfig(mode="topk"))
        stage = build_stage(stage_index + 1, options, pipeline_model_parallel_size=2,
                            expert_model_parallel_size=2)  # fmt: skip
        events = []
        stage.config.finalize_model_grads_func = lambda *a, **k: events.append("finalize")
        args = SimpleNamespace(curr_iteration=0, log_interval=LOG_INTERVAL)
        hooks = MegatronLMHooks(
            get_args=lambda: args, step_routers=step_routers,
            reduce_group=lambda: dist.group.WORLD,
        )  # fmt: skip
        local = C2RMetrics().attach(stage)  # the same records, never reduced
        reports, locals_ = [], []
        real_report = hooks.report

        def report(iteration, group=None):
            events.append(f"report {iteration}")
            locals_.append(local.compute())
            local.reset()
            values = real_report(iteration, group=group)
            reports.append((iteration, values))
            return values

        hooks.report = report

        def on_forward():
            local.recording = hooks.metrics.recording

        step = forward_step_for(stage, hooks, on_forward)
        with cpu_schedules():
            run_iterations(one_f_one_b, stage, step, args, ITERATIONS, seed=dist.get_rank())
        return dict(stage=stage_index, events=events, reports=reports, locals=locals_,
                    hooked=hooks.after_iteration_hooked)  # fmt: skip
    finally:
        ps.destroy_model_parallel()


@pytest.mark.world_size(4)
def test_metrics_are_reduced_after_the_iteration_over_every_stage_and_dp_rank(dist_pool):
    from megatron_c2r.metrics.report import METRIC_NAMES, PREFIX

    def reduced(values):  # names outside METRIC_NAMES stay local by design
        return {k: v for k, v in values.items() if k[len(PREFIX) + 1:].split("_layer_")[0] in METRIC_NAMES}

    results = dist_pool(4).run(_two_stages_two_dp_ranks)
    assert sorted(r["stage"] for r in results) == [0, 0, 1, 1]
    for rank, r in enumerate(results):
        assert r["hooked"]
        # Megatron's finalize once per iteration, our report right after it on logged ones.
        assert r["events"] == ["finalize", "finalize", "report 2", "finalize", "finalize", "report 4"]
        assert [it for it, _ in r["reports"]] == [2, 4]
        for (_, values), (_, first) in zip(r["reports"], results[0]["reports"]):
            assert reduced(values) == reduced(first), f"rank {rank} reports other numbers"
    for index, (iteration, values) in enumerate(results[0]["reports"]):
        for layer in (0, 1):  # stage 0 holds layer 0, stage 1 layer 1; every rank sees both
            holders = [r["locals"][index] for r in results if r["stage"] == layer]
            for name in ("ranks_per_token", "tokens_per_expert_max_over_mean"):
                key = f"moe/c2r/{name}_layer_{layer}"
                want = sum(h[key] for h in holders) / len(holders)
                assert values[key] == pytest.approx(want, rel=1e-9), (iteration, key)
            assert values[f"moe/c2r/rows_per_token_alltoall_layer_{layer}"] == pytest.approx(2.0)
