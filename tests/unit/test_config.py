"""Run configs: YAML -> validated dataclasses -> argv; extends, --set, and one-line errors."""

import argparse
import os
import textwrap

import pytest

from megatron_c2r.cpu.job_config import load_cpu_config
from megatron_c2r.errors import ConfigError
from megatron_c2r.megatron_lm.arguments import add_c2r_args, c2r_options_from_args
from megatron_c2r.run_config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MOE = """
megatron:
  --num-layers: 2
  --hidden-size: 64
  --num-attention-heads: 4
  --seq-length: 32
  --max-position-embeddings: 32
  --micro-batch-size: 2
  --global-batch-size: 8
  --train-iters: 5
  --num-experts: 8
  --moe-router-topk: 2
  --expert-model-parallel-size: 2
launch: {nodes: 1, gpus_per_node: 4}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def megatron_style_parser():
    """The shape of Megatron-LM's parser: allow_abbrev=False, flags in groups, our group added
    through the extra_args_provider protocol (returns the parser)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    group = parser.add_argument_group("model")
    group.add_argument("--num-layers", type=int)
    group.add_argument("--num-experts", type=int)
    group.add_argument("--use-mcore-models", action="store_true")
    return add_c2r_args(parser)


def test_megatron_section_becomes_argv_in_file_order_with_bare_and_omitted_booleans(tmp_path):
    path = write(tmp_path, "a.yaml", """
        megatron:
          --num-layers: 4
          --use-mcore-models: true
          --no-rope-fusion: false
          --data-path: [0.5, /d/a, 0.5, /d/b]
          --lr: 3.0e-4
    """)
    assert load_config(path).megatron_argv() == [
        "--num-layers", "4", "--use-mcore-models", "--data-path", "0.5", "/d/a", "0.5", "/d/b",
        "--lr", "0.0003",
    ]


def test_extends_merges_bases_and_null_removes_an_inherited_flag(tmp_path):
    write(tmp_path, "base.yaml", MOE + "\nenv: {A: 1}\n")
    path = write(tmp_path, "child.yaml", """
        extends: base.yaml
        megatron:
          --expert-model-parallel-size: null
          num-layers: 6
        env: {B: two}
    """)
    cfg = load_config(path)
    assert "expert-model-parallel-size" not in cfg.megatron
    assert cfg.megatron["num-layers"] == 6 and cfg.megatron["num-experts"] == 8
    assert cfg.env == {"A": "1", "B": "two"}


def test_set_overrides_parse_values_as_yaml_and_accept_flags_with_or_without_dashes(tmp_path):
    path = write(tmp_path, "a.yaml", MOE + "c2r: {mode: group}\n")
    cfg = load_config(
        path, ["c2r.max_groups=2", "megatron.--train-iters=7", "megatron.num-layers=3", "c2r.expert_to_group=[0,0,0,0,1,1,1,1]"]
    )
    assert cfg.c2r.router.max_groups == 2
    assert cfg.megatron["train-iters"] == 7 and cfg.megatron["num-layers"] == 3
    assert cfg.c2r.router.expert_to_group == (0, 0, 0, 0, 1, 1, 1, 1)


def test_absent_c2r_section_is_a_baseline_that_still_uses_our_entry_point(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", MOE))
    assert not cfg.c2r.enabled
    assert cfg.program_argv()[:3] == ["python", "-m", "megatron_c2r.megatron_lm"]
    assert "--c2r-disable" in cfg.c2r_argv()


def test_c2r_flags_round_trip_through_a_megatron_style_parser(tmp_path):
    path = write(tmp_path, "a.yaml", MOE + textwrap.dedent("""
        c2r:
          mode: c2r
          top_t: 5
          warmup_steps: 100
          refresh_interval: 50
          penalty_coeff: 0.01
          track_collaboration: true
          dispatcher: megatron
          metrics_csv: out/m.csv
          expert_to_group: [0, 0, 0, 0, 1, 1, 1, 1]
    """))
    cfg = load_config(path)
    args = megatron_style_parser().parse_args(["--num-layers", "2", *cfg.c2r_argv()])
    assert c2r_options_from_args(args) == cfg.c2r
    assert args.num_layers == 2


def test_exponent_floats_without_a_dot_are_floats_in_yaml_and_set(tmp_path):
    # PyYAML follows YAML 1.1, where 1e-4 (no dot) is a string.
    path = write(tmp_path, "a.yaml", MOE + "c2r: {mode: group, penalty_coeff: 1e-4}\n")
    assert load_config(path).c2r.router.penalty_coeff == 1e-4
    assert load_config(path, ["c2r.penalty_coeff=3E-5"]).c2r.router.penalty_coeff == 3e-5


def test_default_c2r_flags_parse_to_the_default_options():
    args = megatron_style_parser().parse_args([])
    options = c2r_options_from_args(args)
    assert options.enabled and options.router.mode == "group" and options.dispatcher == "dedup"


BAD = [
    ("unknown section", "megatorn: {}\n", "megatorn: unknown section"),
    ("unknown c2r key", "c2r: {max_group: 1}\n", "c2r.max_group: unknown option"),
    ("wrong type", "c2r: {max_groups: two}\n", "c2r.max_groups='two' must be a int"),
    ("bool is not int", "c2r: {warmup_steps: true}\n", "c2r.warmup_steps=True must be a int"),
    ("bad mode", "c2r: {mode: fancy}\n", "c2r.mode='fancy' must be one of"),
    ("float word", "c2r: {penalty_coeff: small}\n", "c2r.penalty_coeff='small' must be a float"),
    ("missing top_t", "c2r: {mode: c2r}\n", "c2r.top_t is required"),
    ("max_groups too big", "c2r: {max_groups: 3}\n", "c2r.max_groups=3 must be in [1, num_groups=2]"),
    ("bad dispatcher", "c2r: {dispatcher: nccl}\n", "c2r.dispatcher='nccl' must be one of"),
    ("underscore flag", "megatron: {--num_layers: 2}\n", "megatron.--num_layers: Megatron flags use dashes"),
    ("dict flag value", "megatron: {--lr: {a: 1}}\n", "megatron.--lr="),
    ("bad launch key", "launch: {gpus: 8}\n", "launch.gpus: unknown option"),
    ("bad slurm time", "slurm: {time: soon}\n", "slurm.time='soon' must be a SLURM time"),
    ("bad env name", "env: {1X: a}\n", "env.1X: not a valid environment variable name"),
]


@pytest.mark.parametrize("case,extra,message", BAD, ids=[b[0] for b in BAD])
def test_each_bad_config_fails_with_one_line_naming_the_yaml_path(tmp_path, case, extra, message):
    path = write(tmp_path, "bad.yaml", MOE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith(path)


CONTRADICTIONS = [
    ("c2r without MoE", ["megatron.num-experts=null", "c2r.mode=group"], "c2r: C2R options need an MoE model"),
    ("EP does not divide experts", ["megatron.expert-model-parallel-size=3", "launch.gpus_per_node=3"],
     "megatron.--num-experts=8 must be divisible by --expert-model-parallel-size=3"),
    ("dedup with flex", ["c2r.mode=group", "megatron.moe-token-dispatcher-type=flex"],
     "c2r.dispatcher='dedup' replaces Megatron's dispatcher"),
    ("group-limited with c2r", ["c2r.mode=group", "megatron.moe-router-num-groups=2"],
     "megatron.--moe-router-num-groups=2 contradicts c2r.mode='group'"),
    ("world not divisible", ["megatron.tensor-model-parallel-size=3"], "is not divisible by TP x PP x CP"),
    ("batch arithmetic", ["megatron.global-batch-size=6"],
     "megatron.--global-batch-size=6 must be a multiple of micro-batch-size x DP=2x4=8"),
    ("EP grid", ["megatron.pipeline-model-parallel-size=4"], "must divide world/PP=1"),
]


@pytest.mark.parametrize("case,sets,message", CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
def test_each_contradiction_fails_before_anything_runs(tmp_path, case, sets, message):
    path = write(tmp_path, "a.yaml", MOE)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path, sets)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_file_errors_are_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("x: 1")
    cycle_a = write(tmp_path, "ca.yaml", "extends: cb.yaml\n")
    write(tmp_path, "cb.yaml", "extends: ca.yaml\n")
    broken = write(tmp_path, "broken.yaml", "megatron: [unclosed\n")
    listing = write(tmp_path, "list.yaml", "- a\n- b\n")
    cases = [
        (str(tmp_path / "a.txt"), "not a YAML file"),
        (str(tmp_path / "nope.yaml"), "no such config file"),
        (cycle_a, "extends: cycle ca.yaml -> cb.yaml -> ca.yaml"),
        (broken, "invalid YAML"),
        (listing, "top level is a list"),
    ]
    for path, message in cases:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert message in str(info.value) and "\n" not in str(info.value), path


def test_cluster_path_requires_the_flags_every_gpt_run_sets(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", MOE), ["megatron.seq-length=null"])
    with pytest.raises(ConfigError, match=r"megatron.--seq-length is required"):
        cfg.check_megatron_lm()
    cfg = load_config(write(tmp_path, "b.yaml", MOE), ["megatron.spec=[m, n]"])
    with pytest.raises(ConfigError, match=r"megatron.--spec=.*remove --spec"):
        cfg.check_megatron_lm()
    cfg = load_config(write(tmp_path, "c.yaml", MOE), ["c2r.mode=group", "c2r.refresh_interval=50"])
    with pytest.raises(ConfigError, match=r"c2r.refresh_interval=50 with c2r.mode='group'.*set c2r"):
        cfg.check_megatron_lm()
    args = megatron_style_parser().parse_args(["--c2r-mode", "group", "--c2r-refresh-interval", "50"])
    with pytest.raises(ConfigError, match=r"c2r.refresh_interval=50 with c2r.mode='group'"):
        c2r_options_from_args(args)


def test_cpu_runner_refuses_refresh_windows_it_would_not_replan(tmp_path):
    sets = ["c2r.mode=group", "c2r.refresh_interval=50", "cpu.replan=false"]
    with pytest.raises(ConfigError, match=r"c2r.refresh_interval=50 re-plans.*cpu.replan=false"):
        load_cpu_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), sets)
    assert load_cpu_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), sets[:2]).replan


def test_a_bad_set_is_blamed_on_the_set_and_a_bad_file_value_on_the_file(tmp_path):
    path = write(tmp_path, "a.yaml", MOE + "c2r: {mode: group, max_groups: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: c2r.max_groups=3 must be in")
    good = write(tmp_path, "b.yaml", MOE + "c2r: {mode: group}\n")
    cases = {
        ("c2r.max_groups=3",): "--set c2r.max_groups=3: c2r.max_groups=3 must be in",
        ("c2r={mode: group, max_groups: 5}",): "--set c2r={mode: group, max_groups: 5}: ",
        ("megatron.--moe-router-topk=9",): "--set megatron.--moe-router-topk=9: megatron.--moe-",
        # EP came from the file, experts from the --set: the --set changed the outcome.
        ("c2r.max_groups=1", "megatron.num-experts=7"): "--set megatron.num-experts=7: ",
        ("launch.nodes=0",): "--set launch.nodes=0: launch.nodes=0 must be >= 1",
        ("slurm.time=soon",): "--set slurm.time=soon: slurm.time='soon' must be a SLURM time",
        ("megatron.tensor-model-parallel-size=0",):
            "--set megatron.tensor-model-parallel-size=0: megatron.--tensor-model-parallel-size=0",
    }  # fmt: skip
    for sets, prefix in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(good, list(sets))
        assert str(info.value).startswith(prefix), (sets, str(info.value))
    values = [("megatron.train-iters", 0, "--steps 0")]
    cfg = load_config(good, values=values)  # the cluster schema does not check train-iters
    assert cfg.megatron["train-iters"] == 0
    with pytest.raises(ConfigError, match=r"^--steps 0: megatron.--train-iters=0 must be >= 1"):
        load_cpu_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), train_iters=0)


def test_top_k_above_the_experts_is_a_top_k_error_before_the_max_groups_check(tmp_path):
    path = write(tmp_path, "a.yaml", MOE + "c2r: {mode: group, max_groups: 1}\n")
    for topk, message in [(9, "megatron.--moe-router-topk=9 must be <= --num-experts=8"),
                          (0, "megatron.--moe-router-topk=0 must be >= 1"),
                          (5, "moe_router_topk=5 exceeds c2r.max_groups=1")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(path, [f"megatron.moe-router-topk={topk}"])
    with pytest.raises(ConfigError, match="megatron.--moe-router-topk=9 must be <= --num-experts=8"):
        load_config(write(tmp_path, "b.yaml", MOE), ["megatron.moe-router-topk=9"])  # baseline too


def test_cpu_job_config_checks_use_yaml_names_and_the_shared_parallel_rules():
    from megatron_c2r.cpu.job_config import CPUTrainConfig

    for kwargs, message in [
        ({"ep_size": 0}, "megatron.--expert-model-parallel-size=0 must be >= 1"),
        ({"ep_size": 3}, "megatron.--num-experts=16 must be divisible by --expert-model-parallel-size=3"),
        ({"topk": 17}, "megatron.--moe-router-topk=17 must be <= --num-experts=16"),
        ({"train_iters": 0}, "megatron.--train-iters=0 must be >= 1"),
        ({"threads": 0}, "cpu.threads=0 must be >= 1"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            CPUTrainConfig(**kwargs)


def test_cpu_job_sizes_fit_its_own_processes_not_the_launch_section(tmp_path):
    # The CPU job runs one gloo process per EP rank: EP=3 (48 experts) is a valid 3-process job
    # even though 3 does not divide the launch: default world of 8, which it never uses.
    tiny = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
    sets = ["megatron.expert-model-parallel-size=3", "megatron.num-experts=48"]
    assert load_cpu_config(tiny, sets).ep_size == 3
    with pytest.raises(ConfigError, match="must divide world/PP=8"):  # the cluster rule stays
        load_config(tiny, sets)
    # What is wrong is still named: experts not divisible by EP, unsupported TP.
    with pytest.raises(ConfigError, match="--num-experts=16 must be divisible by "
                                          "--expert-model-parallel-size=3"):  # fmt: skip
        load_cpu_config(tiny, sets[:1])
    with pytest.raises(ConfigError, match="tensor-model-parallel-size is not supported by the CPU"):
        load_cpu_config(tiny, ["megatron.tensor-model-parallel-size=3"])


def test_steps_shorter_than_the_warmup_scale_it_and_say_so_and_longer_runs_are_untouched():
    from megatron_c2r.cpu.job_config import load_train_job

    tiny = os.path.join(ROOT, "configs", "tiny_cpu.yaml")  # 300 iterations, warm-up 60
    cfg, notes = load_train_job(tiny, [], train_iters=20)
    assert (cfg.train_iters, cfg.c2r.router.warmup_steps) == (20, 4)
    assert len(notes) == 1 and "warm-up set to 4" in notes[0] and "--resume" in notes[0]
    assert load_train_job(tiny, [], train_iters=20) == (cfg, notes)  # the same on --resume
    for steps, warmup in [(None, 60), (80, 60), (61, 60), (60, 12), (2, 1), (1, 0)]:
        cfg, notes = load_train_job(tiny, [], train_iters=steps)
        assert cfg.c2r.router.warmup_steps == warmup and bool(notes) == (warmup != 60), steps
    # A warm-up the user chose is theirs: refused with the fix, blamed on their --set.
    with pytest.raises(ConfigError) as info:
        load_train_job(tiny, ["c2r.warmup_steps=30"], train_iters=20)
    assert str(info.value).startswith("--set c2r.warmup_steps=30: c2r.warmup_steps=30 must be "
                                      "below megatron.--train-iters=20")  # fmt: skip
    assert "--set c2r.warmup_steps=N (N < 20)" in str(info.value)
    assert load_train_job(tiny, ["c2r.enabled=false"], train_iters=20)[1] == []


def test_docs_config_lists_every_c2r_key_and_render_format():
    import dataclasses

    from megatron_c2r.megatron_lm.flags import ROUTER_FIELDS
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.render import FORMATS

    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        doc = f.read()
    own = [f.name for f in dataclasses.fields(C2ROptions) if f.name != "router"]
    missing = [k for k in (*ROUTER_FIELDS, *own) if f"\n  {k}:" not in doc]
    assert not missing, f"docs/config.md's c2r: block lacks {missing}"
    assert all(f"| `{fmt}`" in doc for fmt in FORMATS)


def test_cpu_runner_refuses_node_first_planning_without_nodes(tmp_path):
    sets = ["c2r.mode=group", "cpu.replan_nodes=true"]
    with pytest.raises(ConfigError, match=r"cpu.replan_nodes=true plans nodes first.*c2r.num_nodes"):
        load_cpu_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), sets)
