"""The Megatron-LM entry point pieces that run without a GPU: requirement errors, the
per-iteration hook schedule (router steps, metric logging), and the compat kwargs filter."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_c2r import compat
from megatron_c2r.megatron_lm.hooks import MegatronLMHooks
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "olmoe_1b_7b_c2r.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_pretrain_without_checkout_or_cuda_says_what_is_missing_in_one_line(tmp_path, capsys, monkeypatch):
    from megatron_c2r import pretrain
    from megatron_c2r.megatron_lm import entry as train

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("MEGATRON_LM_PATH", "")
    assert pretrain.main([CONFIG, "--set", f"launch.megatron_lm={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no pretrain_gpt.py" in err and "CUDA" in err
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert pretrain.main([CONFIG, "--set", f"launch.megatron_lm={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Megatron-LM checkout" not in err and "CUDA" in err
    assert train.main(["--num-layers", "2"]) == 2
    assert "Megatron-LM checkout: set launch.megatron_lm" in capsys.readouterr().err


def test_pretrain_dry_run_prints_the_rendered_command(capsys):
    from megatron_c2r import pretrain

    assert pretrain.main([CONFIG, "--dry-run", "--set", "megatron.train-iters=3"]) == 0
    out = capsys.readouterr().out
    assert "python -m megatron_c2r.megatron_lm" in out and "--train-iters 3" in out


def test_python_m_entry_points_exist():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_c2r.pretrain", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "--set" in out.stdout


def test_supported_kwargs_drops_keywords_a_constructor_does_not_take():
    class Old:
        def __init__(self, config, vp_stage=None):
            pass

    assert compat.supported_kwargs(Old, {"config": 1, "vp_stage": 2, "pg_collection": 3}) == {
        "config": 1, "vp_stage": 2,
    }  # fmt: skip


@pytest.fixture
def stage(megatron_world1):
    """One MoE layer (C2R router: group mode, 2 warm-up steps; Megatron's dispatcher) as the
    model chunk Megatron's schedules run (tests/distributed/test_hooks_pipeline.Stage)."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from tests.distributed.test_hooks_pipeline import Stage

    init_parallel()
    config = moe_config(num_layers=1)
    options = C2ROptions(router=C2RRouterConfig(mode="group", warmup_steps=2), dispatcher="megatron")
    spec = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False).layer_specs[0]
    with megatron_cpu():
        layer = build_from_spec(spec.submodules.mlp, config=config, layer_number=1)
    layer.set_layer_number(1)
    return Stage(layer, config).train()


def _run_hooks(stage, tmp_path, finalize):
    """Five iterations of two micro-batches through Megatron's no-pipelining schedule with the
    hooks; ``finalize`` is what the config's finalize_model_grads_func holds (None: fallback)."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megatron_c2r.moe.router import step_routers
    from tests.distributed.test_hooks_pipeline import cpu_schedules, forward_step_for, run_iterations

    args = SimpleNamespace(curr_iteration=0, log_interval=2)
    steps, reports = [], []

    def record_step(m, iteration):
        steps.append(iteration)
        step_routers(m, iteration)

    hooks = MegatronLMHooks(
        get_args=lambda: args, step_routers=record_step, csv_path=str(tmp_path / "m.csv")
    )
    real_report = hooks.report
    hooks.report = lambda it, group=None: reports.append((it, real_report(it, group)))
    stage.config.finalize_model_grads_func = finalize
    with cpu_schedules():
        run_iterations(forward_backward_no_pipelining, stage, forward_step_for(stage, hooks), args, 5)
    return hooks, steps, reports


@pytest.mark.parametrize("hooked", [True, False], ids=["after_finalize", "fallback"])
def test_hooks_step_routers_once_per_iteration_and_log_every_interval(stage, tmp_path, hooked):
    finalized = []
    hooks, steps, reports = _run_hooks(
        stage, tmp_path, (lambda *a, **k: finalized.append(a)) if hooked else None
    )
    assert hooks.after_iteration_hooked is hooked
    assert len(finalized) == (5 if hooked else 0)  # Megatron's own finalize still runs
    assert steps == [0, 1, 2, 3]  # after iterations 0..3, seen at the start of 1..4
    # Megatron logs iteration n after step n-1: reported after iterations 1 and 3 (hooked), or
    # at the first forward of iterations 2 and 4 (fallback).
    assert [it for it, _ in reports] == [2, 4]
    assert reports[0][1]["moe/c2r/constraint_active"] == 0.0  # iteration 1: still warming up
    assert reports[1][1]["moe/c2r/constraint_active"] == 1.0  # iteration 3: constrained
    assert stage.layer.router._active
    with open(tmp_path / "m.csv") as handle:
        assert handle.readline().strip() == "iteration,metric,value"
