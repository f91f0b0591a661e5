"""launch/local.sh: torchrun on one GPU machine, the CPU main job without GPUs (fake nvidia-smi,
torchrun and megatron-c2r from tests/launch_fakes.py; the real renderer for the GPU path)."""

from __future__ import annotations

from megatron_c2r.run_config import load_config
from tests.launch_fakes import REPO, FakeCluster


def test_without_gpus_local_sh_runs_the_cpu_main_job_on_tiny_cpu_and_logs_per_run(tmp_path):
    cluster = FakeCluster(tmp_path)
    result = cluster.run("launch/local.sh", [], cluster.env({"FAKE_GPUS": "0", "RUN_ID": "r1"}))
    assert result.returncode == 0, result.stderr
    (call,) = cluster.recorded("megatron-c2r")
    assert call["argv"] == ["train", "--config", f"{REPO}/configs/tiny_cpu.yaml"]
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert (cluster.logs / "r1" / "train.log").exists()
    assert not cluster.recorded("torchrun")


def test_cpu_path_passes_overrides_and_resume_to_megatron_c2r_train(tmp_path):
    cluster = FakeCluster(tmp_path)
    env = cluster.env({"FAKE_GPUS": "0", "RESUME": "1"})
    result = cluster.run("launch/local.sh", ["configs/tiny_cpu.yaml", "--set=c2r.max_groups=2"], env)
    assert result.returncode == 0, result.stderr
    (call,) = cluster.recorded("megatron-c2r")
    assert call["argv"] == ["train", "--config", f"{REPO}/configs/tiny_cpu.yaml",
                            "--set", "c2r.max_groups=2", "--resume"]  # fmt: skip


def test_with_gpus_local_sh_runs_torchrun_standalone_with_the_rendered_command(tmp_path):
    cluster = FakeCluster(tmp_path)
    config = "configs/olmoe_1b_7b_c2r.yaml"  # 1 node x 8 GPUs
    sets = [f"launch.megatron_lm={cluster.megatron_lm}"]
    result = cluster.run("launch/local.sh", [config, "--set", sets[0]], cluster.env({"FAKE_GPUS": "8"}))
    assert result.returncode == 0, result.stderr
    (call,) = cluster.recorded("torchrun")
    flags = load_config(str(REPO / config), sets).program_argv()[3:]
    ckpt = str(cluster.ckpt)
    assert call["argv"] == ["--standalone", "--nnodes=1", "--nproc-per-node=8",
                            "-m", "megatron_c2r.megatron_lm", *flags,
                            "--save", ckpt, "--load", ckpt, "--exit-signal-handler"]  # fmt: skip
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert call["env"]["MEGATRON_LM_PATH"] == str(cluster.megatron_lm)


def test_local_sh_fails_fast_on_a_missing_config(tmp_path):
    cluster = FakeCluster(tmp_path)
    result = cluster.run("launch/local.sh", ["configs/nope.yaml"], cluster.env({"FAKE_GPUS": "8"}))
    assert result.returncode == 1
    assert result.stderr.startswith("local.sh: error: config not found: configs/nope.yaml")
