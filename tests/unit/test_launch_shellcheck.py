"""Every launch script (and the image's install script) is shellcheck-clean, sourced files
followed (-x) from the repository root."""

from __future__ import annotations

import os
import subprocess

from tests.launch_fakes import REPO, linter

SCRIPTS = ["launch/lib.sh", "launch/local.sh", "launch/slurm/pretrain.sbatch",
           "launch/slurm/torchrun.sbatch", "launch/slurm/submit.sh", "docker/install.sh",
           "launch/slurm/cpu_train.sbatch", ".ci/run", "tests/gpu/stage_device_check.sh"]  # fmt: skip


def test_launch_scripts_are_shellcheck_clean():
    result = subprocess.run([linter("shellcheck"), "-x", *SCRIPTS], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_users_run_are_executable_and_start_with_a_usage_header():
    for script in SCRIPTS[1:]:
        path = REPO / script
        assert os.access(path, os.X_OK), script
        lines = path.read_text().splitlines()
        assert lines[0] == "#!/bin/bash", script
        header = "\n".join(lines[1:15])
        assert script in header, f"{script}: usage header must show the command that runs it"
