"""``render``/``pretrain`` and the entry run Megatron's argument defaulting and every model-build
check that needs no GPU (``megatron_lm.build_check``) on real megatron.core, whichever version is
installed (0.16.1 without Megatron's parser, 0.17+ with it): no shipped or user config passes
``render`` and dies building the model on every rank after the nodes are allocated."""

import os

import pytest

from megatron_c2r.cli import main as cli_main
from megatron_c2r.megatron_lm import preflight
from megatron_c2r.megatron_lm.build_check import megatron_args
from megatron_c2r.run_config import load_config
from tests.unit.test_config_render import CLUSTER, ROOT


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("config", CLUSTER)
def test_every_shipped_cluster_config_builds_after_megatrons_defaults(at_root, config, capsys):
    argv = load_config(config).program_argv()[3:]
    assert preflight.model_build_problem(argv) is None
    assert cli_main(["render", config, "--format", "args"]) == 0
    assert capsys.readouterr().out.splitlines()[3:] == argv


def test_megatrons_default_expert_tp_is_tp_and_the_dedup_dispatcher_refuses_it_at_render(at_root, capsys):
    """The shipped mixtral config before the fix: TP=2 + sequence parallel, no expert TP."""
    config = "configs/mixtral_8x7b_c2r.yaml"
    unset = ["megatron.expert-tensor-parallel-size=null"]
    argv = load_config(config, unset).program_argv()[3:]
    assert megatron_args(argv).expert_tensor_parallel_size == 2
    assert "expert_tensor_parallel_size=2" in preflight.model_build_problem(argv)
    assert cli_main(["render", config, "--set", *unset]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "model build: expert_tensor_parallel_size=2 is not supported by the dedup" in err
    # the baseline (Megatron's dispatcher) builds with expert TP 2
    baseline = load_config("configs/mixtral_8x7b.yaml", unset).program_argv()[3:]
    assert preflight.model_build_problem(baseline) is None


def test_a_transformer_config_refusal_is_one_line_at_render(at_root, capsys):
    code = cli_main(["render", "configs/mixtral_8x7b_c2r.yaml", "--set",
                     "megatron.num-attention-heads=33"])  # fmt: skip  (TP = 2)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "TransformerConfig refuses" in err and "33" in err


def test_c2r_options_are_resolved_against_the_model_at_build_check():
    argv = load_config(os.path.join(ROOT, "configs/olmoe_1b_7b_c2r.yaml")).program_argv()[3:]
    assert "--c2r-max-groups" in argv
    bad = list(argv)
    bad[bad.index("--c2r-max-groups") + 1] = "99"
    assert "max_groups=99" in preflight.model_build_problem(bad)


def test_render_refuses_a_flag_megatrons_parser_does_not_know_or_says_it_cannot_check_names():
    import subprocess
    import sys

    from megatron_c2r import compat

    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "megatron_c2r", "render",
                          "configs/olmoe_1b_7b_c2r.yaml", "--set", "megatron.no-such-flag=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if compat.megatron_argument_parser() is not None:  # 0.17+: Megatron-LM's parser is here
        assert out.returncode == 2, out.stderr[-2000:]
        assert "does not know --no-such-flag" in out.stderr
    else:  # 0.16 without a checkout: it says what it could not check
        assert out.returncode == 0, out.stderr[-2000:]
        assert "flags checked by the model build only, not by name" in out.stderr
