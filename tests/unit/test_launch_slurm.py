"""launch/slurm/*.sbatch under a fake 2-node x 8-GPU SLURM job (tests/launch_fakes.py).

Each script is run once per module with the real ``megatron-c2r`` renderer on
configs/qwen1.5_moe_a2.7b_c2r.yaml (2 nodes x 8 GPUs); the fake ``srun`` runs tasks 0, 7, 8 and
15 (both nodes, first and last local rank), and the fake ``python``/``torchrun``/``nsys`` record
the argv and environment each task would run with. Checks that need no config (argument errors,
the allocation checks, the requeue loop) drive launch/lib.sh directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from megatron_c2r.run_config import load_config
from tests.launch_fakes import JOB_ID, REPO, FakeCluster

CONFIG = "configs/qwen1.5_moe_a2.7b_c2r.yaml"
TASKS = (0, 7, 8, 15)
# The config's slurm.container_image (our image, built from docker/Dockerfile; a local name, so
# enroot's registry spelling leaves it unchanged).
IMAGE = "megatron-c2r:25.09"


def _rendered_flags(cluster):
    """render's per-process command after ``python -m megatron_c2r.megatron_lm``."""
    cfg = load_config(str(REPO / CONFIG), [f"launch.megatron_lm={cluster.megatron_lm}"])
    argv = cfg.program_argv()
    assert argv[:3] == ["python", "-m", "megatron_c2r.megatron_lm"]
    return argv[3:]


def _restart_flags(cluster):
    # 4 h job (SLURM_JOB_END_TIME - START_TIME) minus the 10 min EXIT_MARGIN_MINS.
    ckpt = str(cluster.ckpt)
    return ["--save", ckpt, "--load", ckpt, "--exit-signal-handler", "--exit-duration-in-mins", "230"]


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    cluster = FakeCluster(tmp_path_factory.mktemp("pretrain"))
    env = cluster.env({**cluster.slurm_env(), "FAKE_SRUN_TASKS": " ".join(map(str, TASKS)),
                       "NSYS_STEPS": "10-12", "NSYS_RANKS": "0,8"})  # fmt: skip
    result = cluster.run(
        "launch/slurm/pretrain.sbatch",
        [CONFIG, "--set", f"launch.megatron_lm={cluster.megatron_lm}"], env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Ranks in NSYS_RANKS run nsys (which would exec python); the others run python directly.
    tasks = {int(c["env"]["RANK"]): c for c in cluster.recorded("python") + cluster.recorded("nsys")}
    return cluster, tasks


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    cluster = FakeCluster(tmp_path_factory.mktemp("torchrun"))
    env = cluster.env({**cluster.slurm_env(tasks_per_node=1), "FAKE_SRUN_TASKS": "0 1"})
    result = cluster.run(
        "launch/slurm/torchrun.sbatch",
        [CONFIG, "--set", f"launch.megatron_lm={cluster.megatron_lm}"], env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cluster


# --- pattern A: one task per GPU -------------------------------------------------------------
def test_each_task_derives_rank_world_size_local_rank_and_master_from_slurm(pretrain):
    _, tasks = pretrain
    assert sorted(tasks) == list(TASKS)
    for rank, call in tasks.items():
        env = call["env"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "16"
        assert env["LOCAL_RANK"] == str(rank % 8)
        assert env["MASTER_ADDR"] == "gpu-a01"  # first host of SLURM_JOB_NODELIST
        assert env["MASTER_PORT"] == str(20000 + JOB_ID % 10000)


def test_each_task_runs_the_rendered_command_plus_restart_and_profiling_flags(pretrain):
    cluster, tasks = pretrain
    expected = ["-m", "megatron_c2r.megatron_lm", *_rendered_flags(cluster), *_restart_flags(cluster),
                "--profile", "--profile-step-start", "10", "--profile-step-end", "12",
                "--profile-ranks", "0", "8"]  # fmt: skip
    for rank in (7, 15):
        assert tasks[rank]["tool"] == "python" and tasks[rank]["argv"] == expected
    for rank in (0, 8):
        assert tasks[rank]["argv"][-len(expected) - 1 :] == ["python", *expected]
    assert all(call["cwd"] == str(REPO) for call in tasks.values())


def test_only_nsys_ranks_run_under_nsys_with_the_cuda_profiler_capture_range(pretrain):
    cluster, tasks = pretrain
    assert {rank for rank, call in tasks.items() if call["tool"] == "nsys"} == {0, 8}
    log_dir = cluster.logs / f"c2r-test-{JOB_ID}"
    assert tasks[8]["argv"][:6] == [
        "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
        "--trace=cuda,nvtx,osrt,cublas", "--force-overwrite=true", f"--output={log_dir}/nsys/rank8",
    ]  # fmt: skip


def test_config_env_and_cuda_device_max_connections_reach_every_task(pretrain):
    cluster, tasks = pretrain
    for call in tasks.values():
        env = call["env"]
        assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
        assert env["MEGATRON_LM_PATH"] == str(cluster.megatron_lm)


def test_srun_starts_one_task_per_gpu_in_the_configs_container_with_logs_per_job_id(pretrain):
    cluster, _ = pretrain
    (srun,) = cluster.recorded("srun")
    log_dir = cluster.logs / f"c2r-test-{JOB_ID}"
    assert srun["argv"][:10] == [
        "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--label",
        f"--output={log_dir}/train.log", "--open-mode=append", f"--container-image={IMAGE}",
        f"--container-mounts={REPO}:{REPO},{log_dir}:{log_dir},{cluster.ckpt}:{cluster.ckpt}",
        f"--container-workdir={REPO}", "bash",
    ]  # fmt: skip
    assert (log_dir / "command.sh").read_text().startswith(f"# job {JOB_ID} restart 0: 2 nodes x 8")


def _rerun_task(pretrain, **env):
    """Run rank 7's recorded srun command again as task 7, with ``env`` changed."""
    cluster, _ = pretrain
    (srun,) = cluster.recorded("srun")
    command = srun["argv"][srun["argv"].index("bash") :]
    for path in cluster.records.glob("python-7-*.json"):
        path.unlink()
    task_env = dict(srun["env"], SLURM_PROCID="7", SLURM_LOCALID="7", SLURM_NODEID="0")
    task_env.update(env)
    return subprocess.run(command, env=task_env, capture_output=True, text=True, timeout=60)


def test_distributed_variables_set_by_the_container_hook_are_kept(pretrain):
    hook = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "head-ib0",
            "MASTER_PORT": "6000"}  # fmt: skip
    result = _rerun_task(pretrain, **hook)
    assert result.returncode == 0, result.stderr
    (call,) = [c for c in pretrain[0].recorded("python") if c["env"]["RANK"] == "3"]
    assert {k: call["env"][k] for k in hook} == hook


def test_a_task_fails_fast_when_the_megatron_lm_checkout_is_missing(pretrain):
    result = _rerun_task(pretrain, MEGATRON_LM_PATH="/nowhere/Megatron-LM")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "task 7 on gpu-a01: error: Megatron-LM path missing: MEGATRON_LM_PATH=/nowhere/Megatron-LM "
        "has no pretrain_gpt.py (mount a checkout there or set launch.megatron_lm)"
    ]


def test_pretrain_sbatch_fails_fast_when_the_job_has_fewer_gpus_per_node_than_the_config(tmp_path):
    cluster = FakeCluster(tmp_path)
    env = cluster.env({**cluster.slurm_env(gpus=4), "FAKE_SRUN_TASKS": "0"})
    result = cluster.run("launch/slurm/pretrain.sbatch", [CONFIG], env)
    assert result.returncode == 1 and not cluster.recorded("srun")
    assert result.stderr.strip().splitlines()[-1] == (
        "pretrain.sbatch: error: config wants launch.gpus_per_node=8 but the job has 4 GPUs per "
        "node: submit with sbatch --gpus-per-node=8 (or --set launch.gpus_per_node=4)"
    )


# --- pattern B: one torchrun per node ---------------------------------------------------------
def test_torchrun_sbatch_runs_one_torchrun_per_node_with_c10d_rendezvous_on_the_head_node(torchrun):
    cluster = torchrun
    calls = cluster.recorded("torchrun")
    assert sorted(c["env"]["SLURM_NODEID"] for c in calls) == ["0", "1"]
    expected = ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=gpu-a01:{29500 + JOB_ID % 1000}", f"--rdzv-id={JOB_ID}",
                "--max-restarts=0", "-m", "megatron_c2r.megatron_lm", *_rendered_flags(cluster),
                *_restart_flags(cluster)]  # fmt: skip
    for call in calls:
        assert call["argv"] == expected
        assert "RANK" not in call["env"] and "WORLD_SIZE" not in call["env"]  # torchrun's job
        assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    (srun,) = cluster.recorded("srun")
    assert srun["argv"][:2] == ["--nodes=2", "--ntasks-per-node=1"]


# --- submit.sh ---------------------------------------------------------------------------------
def test_submit_sh_builds_the_sbatch_command_from_the_configs_launch_and_slurm_sections(tmp_path):
    cluster = FakeCluster(tmp_path)
    result = cluster.run("launch/slurm/submit.sh", [CONFIG, "--set", "slurm.partition=batch"],
                         cluster.env({"DRY_RUN": "1"}))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "sbatch", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8",
        "--job-name=qwen1.5-moe-a2.7b-c2r", "--partition=batch", "--time=04:00:00", "--exclusive",
        f"{REPO}/launch/slurm/pretrain.sbatch", f"{REPO}/{CONFIG}", "--set", "slurm.partition=batch",
    ]  # fmt: skip


# --- checks that need no config ----------------------------------------------------------------
@pytest.mark.parametrize("script", ["launch/slurm/pretrain.sbatch", "launch/slurm/torchrun.sbatch"])
def test_sbatch_scripts_fail_fast_outside_a_slurm_job_or_without_a_config(tmp_path, script):
    cluster = FakeCluster(tmp_path)
    outside = cluster.run(script, [CONFIG], cluster.env())
    assert outside.returncode == 1 and "not inside a SLURM job" in outside.stderr
    missing = cluster.run(script, ["configs/no_such.yaml"], cluster.env(cluster.slurm_env()))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"{os.path.basename(script)}: error: config not found: configs/no_such.yaml "
        f"(paths are relative to {REPO}; submit from the repository root)"
    ]


def _lib(tmp_path, body, env=None):
    """Run ``body`` in bash after sourcing launch/lib.sh."""
    script = f'set -euo pipefail\nC2R_SCRIPT=t\nsource "{REPO}/launch/lib.sh"\n{body}\n'
    cluster = FakeCluster(tmp_path)
    return subprocess.run(["bash", "-c", script], env=cluster.env(env), capture_output=True,
                          text=True, timeout=60), cluster  # fmt: skip


@pytest.mark.parametrize(
    "image, nodes, gpus, tasks, message",
    [
        ("img", 2, 8, 8, None),
        ("", 2, 8, 8, "no container image: set slurm.container_image in c.yaml or CONTAINER_IMAGE"),
        ("img", 1, 8, 8, "config wants launch.nodes=2 but the job has 1 nodes: submit with sbatch --nodes=2"),
        ("img", 2, 4, 8, "config wants launch.gpus_per_node=8 but the job has 4 GPUs per node"),
        ("img", 2, 8, 1, "the job has 1 tasks per node, this script needs 8: submit with sbatch --ntasks-per-node=8"),
    ],
)  # fmt: skip
def test_allocation_checks_name_the_mismatch_and_the_sbatch_flag_that_fixes_it(
    tmp_path, image, nodes, gpus, tasks, message
):
    env = FakeCluster.slurm_env(nodes=nodes, gpus=gpus, tasks_per_node=tasks)
    body = f"CONFIG=c.yaml CONTAINER_IMAGE={image!r} CFG_NNODES=2 CFG_GPUS_PER_NODE=8\nc2r_check_job 8"
    result, _ = _lib(tmp_path, body, env)
    if message is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1 and result.stderr.startswith(f"t: error: {message}")


@pytest.mark.parametrize(
    "image, pyxis",
    [
        ("nvcr.io/nvidia/pytorch:25.09-py3", "nvcr.io#nvidia/pytorch:25.09-py3"),
        ("registry.example.com:5000/team/megatron-c2r:25.09", "registry.example.com:5000#team/megatron-c2r:25.09"),
        ("nvcr.io#nvidia/pytorch:25.09-py3", "nvcr.io#nvidia/pytorch:25.09-py3"),
        ("/lustre/images/megatron-c2r.sqsh", "/lustre/images/megatron-c2r.sqsh"),
        ("ubuntu:24.04", "ubuntu:24.04"),
    ],
)  # fmt: skip
def test_registry_image_names_are_given_to_pyxis_in_enroot_spelling(tmp_path, image, pyxis):
    body = (f"CONTAINER_IMAGE={image!r} C2R_DIR=/repo LOG_DIR=/repo/logs CKPT_DIR= "
            "CONTAINER_MOUNTS=/data:/data\nc2r_container_args\nprintf '%s\\n' \"${CONTAINER_ARGS[@]}\"")
    result, _ = _lib(tmp_path, body)
    assert result.stdout.splitlines() == [f"--container-image={pyxis}",
                                          "--container-mounts=/repo:/repo,/data:/data",
                                          "--container-workdir=/repo"]  # fmt: skip


def test_nsys_steps_must_be_a_start_end_range(tmp_path):
    result, _ = _lib(tmp_path, "NSYS_STEPS=12-10 NSYS_RANKS=0 LOG_DIR=. c2r_profile_args")
    assert result.returncode == 1
    assert result.stderr == "t: error: NSYS_STEPS=12-10 must be START-END with START < END, e.g. 10-12\n"


def test_time_limit_signal_makes_the_step_checkpoint_and_the_job_requeue(tmp_path):
    marker = tmp_path / "started"
    step = (f"trap 'echo step-got-TERM; exit 0' TERM; touch {marker}; "
            "while :; do sleep 0.05; done")  # fmt: skip
    cluster = FakeCluster(tmp_path / "c")
    script = (f'set -euo pipefail\nC2R_SCRIPT=t\nsource "{REPO}/launch/lib.sh"\n'
              f"REQUEUE=1 CKPT_DIR=/ckpt\nc2r_run_step bash -c {step!r}\n")  # fmt: skip
    proc = subprocess.Popen(["bash", "-c", script], env=cluster.env({"SLURM_JOB_ID": str(JOB_ID)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=B:USR1@900 sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "step-got-TERM"
    assert (cluster.records / "scontrol-requeue.txt").read_text() == f"requeue {JOB_ID}\n"
    assert "requeueing job 4242 (restart 1), resuming from /ckpt" in err
