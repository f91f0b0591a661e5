"""The CPU main job under a real SLURM (Debian's slurmctld/slurmd/munge on localhost): submitted
through our own launch/slurm/cpu_train.sbatch, preempted with SIGTERM mid-training, requeued by
the script, and resumed to the uninterrupted run's losses bit for bit. Skipped, with the reason,
where the daemons are not installed or cannot start (CI installs them: .ci/run)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e.test_cpu_main_job import ROOT, TINY, history

STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd, env=None, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF-style environment of a one-node cluster on this machine."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
               if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing): "
                    "apt-get install slurmd slurmctld slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    base = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=c2rtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "MpiDefault=none",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool",
        f"SlurmctldPidFile={base}/slurmctld.pid", f"SlurmdPidFile={base}/slurmd.pid",
        f"SlurmctldLogFile={base}/slurmctld.log", f"SlurmdLogFile={base}/slurmd.log",
        "ReturnToService=2", "JobRequeue=1", "KillWait=120",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN",
        f"PartitionName=c2r Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
    ]) + "\n")
    (base / "state").mkdir()
    (base / "spool").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    munge = "/usr/sbin/munged" if os.path.exists("/usr/sbin/munged") else "munged"
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["mungekey", "-c"], capture_output=True)
        subprocess.run(["chown", "-R", "munge:munge", "/etc/munge", "/run/munge"], capture_output=True)
        subprocess.run(["runuser", "-u", "munge", "--", munge], capture_output=True)
    try:
        _run("slurmctld", env=env)
        _run("slurmd", env=env)
        deadline = time.monotonic() + 60
        while "idle" not in _run("sinfo", "-h", "-o", "%t", env=env, check=False):
            if time.monotonic() > deadline:
                raise RuntimeError("the node never became idle")
            time.sleep(0.5)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _stop(base)
        pytest.skip(f"the SLURM daemons did not start here: {exc}")
    yield env
    _stop(base)


def _stop(base) -> None:
    for name in ("slurmd.pid", "slurmctld.pid"):
        try:
            pid = int((base / name).read_text())
            os.kill(pid, 15)
        except (OSError, ValueError):
            pass


def _live_step_daemons() -> bool:
    """Whether any slurmstepd is still running (zombies of earlier runs do not count)."""
    ps = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout
    return any(line.split()[1:] == ["slurmstepd"] and not line.split()[0].startswith("Z")
               for line in ps.splitlines() if line.strip())


def _job_state(job: str, env) -> tuple:
    out = _run("scontrol", "show", "job", job, env=env, check=False)
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return fields.get("JobState", "?"), int(fields.get("Restarts", "0") or 0)


def test_a_preempted_job_requeues_itself_and_resumes_to_the_uninterrupted_losses(
        slurm, tmp_path):
    reference = tmp_path / "reference"
    proc = subprocess.run([sys.executable, "-m", "megatron_c2r", "train", "--out", str(reference),
                           "--no-progress", "--steps", str(STEPS), *TINY,
                           "--set", "cpu.plot=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    out, log = tmp_path / "slurm_run", tmp_path / "job.log"
    env = dict(slurm, OUT=str(out), C2R_PYTHON=sys.executable)
    job = _run("sbatch", "--parsable", f"--output={log}", f"--chdir={ROOT}",
               os.path.join(ROOT, "launch", "slurm", "cpu_train.sbatch"),
               os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--steps", str(STEPS), *TINY,
               "--set", "cpu.plot=false", env=env).strip()
    deadline = time.monotonic() + 300
    while not (out / "metrics.csv").exists():  # training is under way
        assert time.monotonic() < deadline and _job_state(job, slurm)[0] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    _run("scancel", "--signal=TERM", job, env=slurm)  # what preemption sends the job's steps

    # A requeue passes through transient states (the stopped run's exit 75 can show as FAILED
    # for a moment). The requeued job waits out SLURM's restart delay; the test starts it
    # sooner, but only once the old job's step daemons are gone (slurmd refuses to launch a job
    # whose previous instance is still being torn down: "already killed").
    failed_since = None
    while True:
        state, restarts = _job_state(job, slurm)
        if state == "PENDING" and restarts >= 1 and not _live_step_daemons():
            _run("scontrol", "update", f"JobId={job}", "StartTime=now", env=slurm, check=False)
        if state == "COMPLETED" and restarts >= 1:
            break
        failed_since = (failed_since or time.monotonic()) if state == "FAILED" else None
        assert not (failed_since and time.monotonic() - failed_since > 30), log.read_text()[-3000:]
        assert time.monotonic() < deadline + 300, (state, restarts, log.read_text()[-3000:])
        time.sleep(1)
    text = log.read_text()
    assert restarts == 1 and "restart 1:" in text, text[-3000:]
    assert "stopped on a signal after iteration" in text and "requeueing job" in text
    assert "--resume" in text and "Traceback" not in text
    assert history(out) == history(reference)  # bit for bit, every iteration
