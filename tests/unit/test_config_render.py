"""``megatron-c2r render``: golden outputs, formats scripts rely on, and the shipped configs."""

import glob
import json
import os
import subprocess
import sys

import pytest

from megatron_c2r.cli import main as cli_main
from megatron_c2r.run_config import load_config
from megatron_c2r.render import FORMATS, render

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "unit", "golden")
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    if not os.path.basename(p).startswith("_")
)
CLUSTER = [c for c in CONFIGS if "cpu" not in c]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("fmt", ["shell", "json"])
def test_render_matches_the_golden_file(at_root, fmt):
    text = render(load_config("configs/mixtral_8x7b_c2r.yaml"), fmt)
    golden = os.path.join(GOLDEN, f"mixtral_8x7b_c2r.{fmt}")
    if os.environ.get("UPDATE_GOLDEN"):
        with open(golden, "w") as handle:
            handle.write(text)
    with open(golden) as handle:
        assert text == handle.read()


def test_every_format_is_deterministic_and_args_agree_with_json(at_root):
    cfg = load_config("configs/olmoe_1b_7b_c2r.yaml", ["megatron.data-path=[1.0, /data/with space]"])
    outputs = {fmt: render(cfg, fmt) for fmt in FORMATS}
    assert outputs == {fmt: render(cfg, fmt) for fmt in FORMATS}
    command = json.loads(outputs["json"])["command"]
    assert outputs["args"].splitlines() == command
    assert outputs["args0"].split("\0")[:-1] == command
    assert "/data/with space" in command


def test_shell_env_and_launch_formats_read_back_exactly_in_bash(at_root):
    cfg = load_config("configs/qwen1.5_moe_a2.7b_c2r.yaml", ["env.WEIRD=a b'c", "slurm.partition=gpu"])
    script = (
        'set -a; eval "$ENVTXT"; eval "$LAUNCHTXT"; set +a; '
        'printf "%s\\n" "$WEIRD" "$PARTITION" "$NNODES" "$CONTAINER_MOUNTS" "$CUDA_DEVICE_MAX_CONNECTIONS"'
    )
    env = dict(os.environ, ENVTXT=render(cfg, "env"), LAUNCHTXT=render(cfg, "launch"))
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["a b'c", "gpu", "2", "", "1"]


@pytest.mark.parametrize("config", CLUSTER)
def test_every_shipped_cluster_config_validates_and_renders(at_root, config):
    cfg = load_config(config)
    cfg.check_megatron_lm()
    command = cfg.program_argv()
    assert command[:3] == ["python", "-m", "megatron_c2r.megatron_lm"]
    assert ("--c2r-disable" in command) == (not config.endswith("_c2r.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_loads_including_the_cpu_one(at_root, config):
    assert load_config(config).megatron


def test_every_shipped_model_has_a_baseline_and_a_c2r_variant():
    names = {os.path.basename(c)[: -len(".yaml")] for c in CLUSTER}
    for name in names:
        base = name[: -len("_c2r")] if name.endswith("_c2r") else name
        assert {base, base + "_c2r"} <= names, name


def test_cli_render_prints_one_error_line_and_exits_2_for_a_bad_override(at_root, capsys):
    code = cli_main(["render", "configs/olmoe_1b_7b_c2r.yaml", "--set", "c2r.max_groups=9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "c2r.max_groups=9 must be in [1, num_groups=8]" in err


def test_cli_modules_import_without_torch():
    code = (
        "import sys, megatron_c2r.cli, megatron_c2r.render, megatron_c2r.pretrain;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_bash_format_reads_back_as_prefixed_knobs_and_exact_env_and_command_arrays(at_root, tmp_path):
    cfg = load_config("configs/qwen1.5_moe_a2.7b_c2r.yaml",
                      ["env.WEIRD=a b'c", "megatron.data-path=[1.0, /data/with space]"])  # fmt: skip
    script = ('WORLD_SIZE=keep; eval "$TEXT"; printf "%s\\n" "$WORLD_SIZE" "$CFG_WORLD_SIZE"; '
              'printf "%s\\0" "${C2R_ENV[@]}" >"$ENVOUT"; printf "%s\\0" "${C2R_CMD[@]}" >"$CMDOUT"')
    env = dict(os.environ, TEXT=render(cfg, "bash"), ENVOUT=str(tmp_path / "env"),
               CMDOUT=str(tmp_path / "cmd"))  # fmt: skip
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["keep", "16"]  # the config's WORLD_SIZE is CFG_WORLD_SIZE
    assert (tmp_path / "cmd").read_text().split("\0")[:-1] == cfg.program_argv()
    env_items = [f"{k}={v}" for k, v in cfg.environment().items()]
    assert (tmp_path / "env").read_text().split("\0")[:-1] == env_items
