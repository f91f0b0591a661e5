"""The prepared device check in CPU mode, as CI runs it: the script runs the same layer code on a
gloo world of one, writes its JSON report and summary, lists what it skipped, and nothing in it
errors; plus the pieces of the GPU-only entry check that can be shown on CPU (reading router
state from a real torch_dist checkpoint, parsing our console line)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_c2r import compat
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from tests.gpu import device_entry
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "gpu", "device_check.sh")
CHECKS = ("environment", "sync_audit", "speed_memory", "entry_arguments", "entry_path")


def run_script(out_dir, env_extra=None, *flags):
    env = dict(os.environ, PYTHON=sys.executable, MEGATRON_LM_PATH="", **(env_extra or {}))
    return subprocess.run(["bash", SCRIPT, "--out", str(out_dir), "--cpu", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip


def test_cpu_mode_writes_the_report_lists_its_skips_and_no_check_errors(tmp_path):
    result = run_script(tmp_path)
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert result.returncode == (1 if report["failed"] else 0), result.stderr[-2000:]
    assert report["schema"] == 1 and report["mode"] == "cpu"
    statuses = {name: report["checks"][name]["status"] for name in CHECKS}
    assert "error" not in statuses.values(), {n: report["checks"][n].get("error") for n in CHECKS}
    assert statuses == {
        "environment": "info", "sync_audit": "pass", "speed_memory": "pass",
        "entry_arguments": "pass", "entry_path": "skipped",
    }  # fmt: skip
    env = report["checks"]["environment"]
    # 0.19's version string appends `git rev-parse HEAD` of the working directory: compare the release.
    assert env["torch"] == torch.__version__
    assert env["megatron_core"].split("+")[0] == compat.MCORE_VERSION.split("+")[0]
    audit = report["checks"]["sync_audit"]
    assert audit["budget"] == {"forward": 1, "backward": 0}
    for layer in ("c2r_dedup", "megatron_alltoall"):
        counts = audit["layers"][layer]
        assert counts["forward"] == len(counts["forward_sites"]) and counts["backward"] >= 0
    # The CPU model sees Megatron's wait for its split sizes: it really counts.
    assert "Event.synchronize (Megatron's cuda_sync_point)" in audit["layers"]["megatron_alltoall"]["forward_sites"]
    speed = report["checks"]["speed_memory"]
    assert speed["smoke"] and {r["shape"]["routing"] for r in speed["results"]} == {"topk", "group"}
    assert all(r["routing_maps_equal"] and r["ms_c2r_dedup"] > 0 for r in speed["results"])
    assert {s["check"] for s in report["skipped"]} == {"sync_audit", "speed_memory", "entry_path"}
    assert all(s["reason"] for s in report["skipped"])
    summary = (tmp_path / "device_check_summary.txt").read_text().splitlines()
    assert summary == report["summary"] and summary[0] in result.stdout
    assert "installed megatron.core" in result.stdout  # says what it used


def test_without_megatron_core_the_script_says_where_to_get_it_in_one_line(tmp_path):
    python = tmp_path / "python"  # an interpreter without site-packages: megatron.core is missing
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    result = subprocess.run(
        ["bash", SCRIPT, "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHON=str(python), MEGATRON_LM_PATH="", C2R_WHEEL_DIR=str(tmp_path)),
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "MEGATRON_LM_PATH" in result.stderr and "C2R_WHEEL_DIR" in result.stderr


def test_bad_arguments_exit_with_status_2(tmp_path):
    assert run_script(tmp_path, None, "--skip", "no_such_check").returncode == 2


def test_router_state_is_read_from_a_torch_dist_checkpoint(megatron_world1, tmp_path):
    """What the GPU entry check reads from iter_0000004 / iter_0000008, on a CPU checkpoint."""
    from megatron.core.models.gpt import GPTModel

    from megatron_c2r.moe.router import c2r_routers
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    init_parallel()
    config = moe_config(num_layers=2)
    options = C2ROptions(router=C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=2))
    spec = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    with megatron_cpu():
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)
    routers = list(c2r_routers(model))
    for i, router in enumerate(routers):  # as after a warm-up: tracked tokens, lists, active
        router.tracker.record(torch.eye(8, dtype=torch.bool)[torch.arange(10 * (i + 1)) % 8])
        router.activate()
    compat.save_dist_checkpoint(model.sharded_state_dict(), str(tmp_path))
    state = device_entry.router_state(str(tmp_path))
    assert list(state) == ["decoder.layers.mlp.router."]
    layers = state["decoder.layers.mlp.router."]
    assert layers["constraint_active"] == [True, True] and layers["tracker_tokens"] == [10, 20]
    assert torch.equal(layers["top_t_lists"], torch.stack([r.top_t_lists for r in routers]))


def test_constraint_active_is_parsed_from_our_console_line():
    from megatron_c2r.metrics.report import console_line

    log = "\n".join(
        ["noise | lm loss 3.2"]
        + [console_line(i, {"moe/c2r/ranks_per_token": 1.5, "moe/c2r/constraint_active": a})
           for i, a in ((1, 0.0), (2, 0.0), (3, 1.0))]  # fmt: skip
    )
    assert device_entry.metric_values(log, "constraint_active") == [0.0, 0.0, 1.0]
    assert device_entry.metric_values(log, "ranks_per_token") == [1.5] * 3


@pytest.mark.parametrize("use_te", [False, True])
def test_entry_argv_is_what_our_preflight_and_flag_parser_accept(use_te):
    result = device_entry.entry_arguments(use_te)
    assert all(result["checks"].values()), result["checks"]
    assert ("--transformer-impl" in result["argv"]) is not use_te


def test_staging_refuses_a_missing_source_or_another_version_before_downloading(tmp_path):
    """tests/gpu/stage_device_check.sh: one line and status 2, before pip runs (its download
    needs the registry; CI checks the refusals, docs/device_check.md the staged run)."""
    script = os.path.join(ROOT, "tests", "gpu", "stage_device_check.sh")
    env = dict(os.environ, STAGE=str(tmp_path / "stage"), PYTHON="false")  # pip would fail
    missing = subprocess.run(["bash", script, str(tmp_path / "nowhere")], env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "must be a Megatron-LM checkout" in missing.stderr
    tree = tmp_path / "mlm"
    (tree / "megatron" / "core").mkdir(parents=True)
    (tree / "pretrain_gpt.py").write_text("")
    (tree / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 15\nPATCH = 3\n")
    other = subprocess.run(["bash", script, str(tree)], env=dict(env, MCORE_VERSION="0.16.1"),
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 2, other.stderr
    assert "is megatron-core 0.15.3, not MCORE_VERSION=0.16.1" in other.stderr
    assert other.stderr.count("\n") == 1
