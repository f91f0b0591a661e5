"""launch/lib.sh helpers under the scripts' own shell options (set -euo pipefail)."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_head_node_of_a_long_node_list_never_dies_of_sigpipe(tmp_path):
    """`scontrol show hostnames | head -n 1` under pipefail exits 141 once scontrol writes past
    the pipe buffer after head has left: a 1,000-node job failed before it started."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/bash\nfor i in $(seq 0 49999); do echo node$i; done\n")
    fake.chmod(0o755)
    script = (f"set -euo pipefail; source {ROOT}/launch/lib.sh; "
              "for i in 1 2 3; do c2r_first_host; done")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                              "SLURM_JOB_NODELIST": "node[0-49999]"})
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.split() == ["node0"] * 3
