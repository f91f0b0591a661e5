"""Every bad input of every subcommand is ONE line naming the input, its value and the fix, exit
status 2, nothing left behind; config errors come before torch or Megatron is imported (issue 13.3).

Each case runs the real ``megatron-c2r`` command in a fresh interpreter (``main`` from
``megatron_c2r.cli``), which then reports which heavy modules it had imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_c2r.cli import check_output_dir, check_output_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "megatron.core")
_PROBE = (
    "import sys\n"
    "from megatron_c2r.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    "sys.exit(code)\n"
)


def run_cli(*argv: str):
    """(exit status, stderr, heavy modules imported, seconds) of ``megatron-c2r argv``."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    heavy = [m for m in out.stdout.strip().splitlines()[-1:] if m] if out.stdout else []
    return out.returncode, out.stderr, heavy, time.perf_counter() - start


def unwritable_dir(tmp_path) -> str:
    """A directory this process cannot create files in: a 0555 one, or for root (who ignores
    modes) /sys, which refuses everyone."""
    if os.geteuid() != 0:
        path = tmp_path / "read_only"
        path.mkdir(mode=0o555)
        return str(path)
    if os.access("/sys", os.F_OK):
        try:
            with open("/sys/c2r_probe", "w"):
                pass
        except OSError:
            return "/sys"
    pytest.skip("no directory is read-only for this user here")


def cases(tmp_path):
    """(id, argv, text the one line must contain, paths that must not exist afterwards)."""
    out = str(tmp_path / "out")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    ro = unwritable_dir(tmp_path)
    olmoe = "configs/olmoe_1b_7b_c2r.yaml"
    return [
        ("topk_mode_k_too_large",
         ["train", "--set", "c2r.mode=topk", "--set", "megatron.moe-router-topk=17", "--out", out],
         "--set megatron.moe-router-topk=17: megatron.--moe-router-topk=17 must be <= --num-experts=16",
         [out]),
        ("topk_mode_k_zero",
         ["train", "--set", "c2r.mode=topk", "--set", "megatron.moe-router-topk=0", "--out", out],
         "megatron.--moe-router-topk=0 must be >= 1", [out]),
        ("group_mode_k_above_experts_is_a_topk_problem",
         ["train", "--set", "megatron.moe-router-topk=17", "--out", out],
         "megatron.--moe-router-topk=17 must be <= --num-experts=16", [out]),
        ("ep_zero", ["train", "--set", "megatron.expert-model-parallel-size=0", "--out", out],
         "--set megatron.expert-model-parallel-size=0: megatron.--expert-model-parallel-size=0 "
         "must be >= 1", [out]),
        ("out_under_a_file", ["train", "--out", str(afile / "run")],
         f"--out='{afile / 'run'}': '{afile}' is a file, not a directory", []),
        ("out_not_writable", ["train", "--out", os.path.join(ro, "run")],
         f"--out='{os.path.join(ro, 'run')}': cannot write in '{ro}'", [os.path.join(ro, "run")]),
        ("steps_zero", ["train", "--steps", "0", "--out", out],
         "--steps 0: megatron.--train-iters=0 must be >= 1", [out]),
        ("steps_not_a_number", ["train", "--steps", "ten"],
         "megatron-c2r train: error: argument --steps: invalid int value: 'ten'", []),
        ("exit_after_zero", ["train", "--exit-after", "0", "--out", out],
         "--exit-after=0 must be >= 1", [out]),
        ("missing_config", ["train", "--config", "configs/nope.yaml", "--out", out],
         "configs/nope.yaml: no such config file", [out]),
        ("cpu_key_type", ["train", "--set", "cpu.threads=many", "--out", out],
         "--set cpu.threads=many: cpu.threads='many' must be a int", [out]),
        ("set_without_value", ["render", olmoe, "--set", "c2r.max_groups"],
         "--set 'c2r.max_groups': expected section.key=value", []),
        ("set_blamed_not_the_file", ["render", olmoe, "--set", "c2r.max_groups=9"],
         "megatron-c2r render: error: --set c2r.max_groups=9: c2r.max_groups=9 must be in", []),
        ("pretrain_bad_config", ["pretrain", olmoe, "--set", "megatron.num-experts=60"],
         "--set megatron.num-experts=60: megatron.--num-experts=60 must be divisible by "
         "--expert-model-parallel-size=8", []),
        ("plan_ep_zero", ["plan", "--collab", "README.md", "--ep", "0", "--out", out + ".json"],
         "--ep=0 must be >= 1", [out + ".json"]),
        ("plan_out_under_a_file",
         ["plan", "--collab", "README.md", "--ep", "2", "--out", str(afile / "plan.json")],
         f"--out='{afile / 'plan.json'}': '{afile}' is a file, not a directory", []),
        ("plan_collab_missing", ["plan", "--collab", "nope.npy", "--ep", "2"],
         "--collab 'nope.npy': no such file or directory", []),
    ]


def test_every_bad_input_is_one_line_exit_2_nothing_written_and_no_megatron(tmp_path):
    before = sorted(os.listdir(tmp_path))
    failures = []
    for name, argv, message, must_not_exist in cases(tmp_path):
        code, err, heavy, seconds = run_cli(*argv)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and message in lines[0] and not heavy
              and not any(os.path.lexists(p) for p in must_not_exist))  # fmt: skip
        if not ok:
            failures.append(f"{name}: rc={code} heavy={heavy} {seconds:.1f}s stderr={err!r}")
    assert not failures, "\n".join(failures)
    after = sorted(p for p in os.listdir(tmp_path) if p not in ("a_file", "read_only"))
    assert after == before


def test_input_file_errors_from_placement_are_one_line_too(tmp_path):
    (tmp_path / "empty.json").write_text("")
    for argv, message in [
        (["plan", "--collab", str(tmp_path / "nope.npy"), "--ep", "2", "--top-k", "2",
          "--out", str(tmp_path / "p.json")], "nope.npy"),
        (["convert", "--load", str(tmp_path), "--plan", str(tmp_path / "nope.json"),
          "--save", str(tmp_path / "o")], "nope.json"),
        (["convert", "--load", str(tmp_path), "--plan", str(tmp_path / "empty.json"),
          "--save", str(tmp_path / "o")], "empty.json"),
    ]:  # fmt: skip
        code, err, _, _ = run_cli(*argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["empty.json"]


def test_help_of_every_subcommand_imports_no_torch_and_points_at_docs_not_sources():
    for command in ["", "train", "pretrain", "render", "plan", "convert", "estimate"]:
        argv = [command, "--help"] if command else ["--help"]
        probe = ("import sys\nfrom megatron_c2r.cli import main\n"
                 "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                 f"assert not [m for m in {HEAVY!r} if m in sys.modules]\n")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                             text=True, cwd=ROOT, check=True)  # fmt: skip
        assert ".py" not in out.stdout and "REFERENCE" not in out.stdout, (command, out.stdout)
        if command == "train":
            assert "megatron.--train-iters" in out.stdout and "README" in out.stdout


def test_output_checks_create_nothing(tmp_path):
    check_output_dir(str(tmp_path / "a" / "b" / "c"), "--out")  # creatable: fine
    check_output_file(str(tmp_path / "plan.json"), "--out")
    with pytest.raises(IsADirectoryError, match="--out='.*' is a directory"):
        check_output_file(str(tmp_path), "--out")
    with pytest.raises(FileNotFoundError, match="does not exist: create it"):
        check_output_file(str(tmp_path / "no" / "plan.json"), "--out")
    assert os.listdir(tmp_path) == []


def test_a_config_error_takes_well_under_a_second_of_our_time():
    # The whole child (interpreter start-up included) vs a bare interpreter: what we add.
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - start
    code, err, heavy, seconds = run_cli("train", "--set", "megatron.expert-model-parallel-size=0")
    assert code == 2 and not heavy
    assert seconds - bare < 1.5, (seconds, bare, json.dumps(err))
