"""The README's first command, shrunk: `megatron-c2r train` end to end in real subprocesses
(2 gloo ranks each), its outputs, `--resume`, kill -9 during checkpoint saves, and the one-line
errors a user sees (including those raised inside a worker)."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SETS = [
    "megatron.num-layers=2", "megatron.hidden-size=64", "megatron.ffn-hidden-size=128",
    "megatron.moe-ffn-hidden-size=64", "megatron.seq-length=64",
    "megatron.max-position-embeddings=64", "megatron.micro-batch-size=4", "megatron.eval-iters=2",
    "megatron.log-interval=2", "megatron.lr-warmup-iters=2", "c2r.warmup_steps=3",
    "cpu.corpus_bytes=300000",
]
TINY = [arg for item in TINY_SETS for arg in ("--set", item)]


def megatron_c2r(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_c2r", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def train(out_dir, *extra, expect=0):
    proc = megatron_c2r("train", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
                        "--out", str(out_dir), "--no-progress", *TINY, *extra)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def history(out_dir):
    with open(os.path.join(out_dir, "history.csv"), newline="") as f:
        return {int(r["iteration"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = train(out, "--steps", "8")
    return out, proc


def test_the_main_job_writes_every_output_and_ships_fewer_rows_than_alltoall(full_run):
    out, proc = full_run
    for name in ("summary.json", "history.csv", "metrics.csv", "training.png", "collaboration.npy",
                 "checkpoint/iter_0000008/meta.json", "checkpoint/iter_0000008/rank0.pt",
                 "checkpoint/iter_0000008/rank1.pt", "data"):
        assert os.path.exists(os.path.join(out, name)), name
    events = os.listdir(os.path.join(out, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in events)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert "megatron-c2r tiny CPU pretraining" in proc.stdout
    assert summary["iterations"] == 8 and summary["resumed_at"] == []
    # After the warm-up the anchored group rule (M=1) puts every token on one rank.
    assert summary["ranks_per_token"] < summary["config"]["topk"]
    assert summary["ranks_per_token"] == pytest.approx(1.0)
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        names = {row["metric"] for row in csv.DictReader(f)}
    assert {"moe/c2r/ranks_per_token", "moe/c2r/rows_per_token_alltoall"} <= names


def test_a_run_prints_what_the_cpu_path_uses_once_and_no_megatron_fallback_notices(full_run):
    _, proc = full_run
    output = proc.stdout + proc.stderr
    assert output.count("CPU runner: 2 gloo processes") == 1
    for notice in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                   "Unknown MLP type", "full scope is deprecated", "Traceback"):
        assert notice not in output, output


def test_plan_reads_the_tracker_state_the_job_writes(full_run, tmp_path):
    out, _ = full_run
    plan = tmp_path / "plan.json"
    proc = megatron_c2r("plan", "--collab", str(out / "collaboration.npy"), "--ep", "2",
                        "--top-k", "4", "--out", str(plan), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    layers = json.loads(plan.read_text())["layers"]
    assert len(layers) == 2  # one per MoE layer of the tiny model


def test_resume_gives_the_same_losses_as_an_uninterrupted_run_and_reports_the_whole_run(
        full_run, tmp_path):
    out, _ = full_run
    train(tmp_path, "--steps", "8", "--exit-after", "5")
    proc = train(tmp_path, "--steps", "8", "--resume")
    assert history(tmp_path) == history(out)  # bit for bit, every iteration
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["iterations"] == 8 and summary["resumed_at"] == [5]
    assert [(s["start"], s["end"]) for s in summary["segments"]] == [(0, 5), (5, 8)]
    assert summary["elapsed_s"] == pytest.approx(sum(s["elapsed_s"] for s in summary["segments"]))
    assert "8 steps in" in proc.stdout and "(resumed at 5)" in proc.stdout
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == [str(i) for i in range(1, 9)]  # "5", never "5.0"
    assert {r["constrained"] for r in rows} == {"0", "1"}


def test_kill_9_during_saves_leaves_a_complete_checkpoint_that_resumes_to_the_same_losses(
        full_run, tmp_path):
    from benchmarks.kill_resume import run_tries

    out, _ = full_run
    lines = []
    summary = run_tries(str(tmp_path), 2, steps=8, sets=TINY_SETS, reference=history(out),
                        seed=1, log=lines.append)
    assert summary["failures"] == [], "\n".join(lines)
    assert summary["tries"] == 2 and summary["chains"] == 1


def _stop_with(out, signum, to_group, resume):
    """Start `train --steps 8` into ``out``, send ``signum`` once it trains (to the launcher, or
    to its whole process group as Ctrl-C does), and return (exit status, stderr, stopped at)."""
    import time

    cmd = [sys.executable, "-m", "megatron_c2r", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--out", str(out), "--no-progress",
           *TINY, "--steps", "8", *(["--resume"] if resume else [])]
    metrics = out / "metrics.csv"
    seen = metrics.stat().st_size if metrics.exists() else 0
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.stat().st_size > seen) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)  # metrics.csv grows at this run's first logged step: it is training
    os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    stopped = json.loads((out / "preempted.json").read_text())["iteration"]
    return proc.returncode, stderr, stopped


def test_signals_stop_after_the_step_with_a_checkpoint_and_the_resumed_chain_is_exact(
        full_run, tmp_path):
    """Ctrl-C (SIGINT to the whole process group), then SLURM preemption (SIGTERM to the launcher,
    which forwards it) on the resumed run: each time the ranks agree on a step, checkpoint it and
    exit 75 (requeue) with one line; the last --resume reproduces the uninterrupted run's losses
    bit for bit."""
    import signal

    out, _ = full_run
    stops = []
    for signum, to_group, resume in ((signal.SIGINT, True, False), (signal.SIGTERM, False, True)):
        code, stderr, stopped = _stop_with(tmp_path, signum, to_group, resume)
        assert code == 75, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.startswith("megatron-c2r train:")]
        assert len(lines) == 1 and f"stopped on a signal after iteration {stopped}" in lines[0]
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
        assert (tmp_path / f"checkpoint/iter_{stopped:07d}/meta.json").exists()
        stops.append(stopped)
    assert 1 <= stops[0] < stops[1] < 8, stops
    resumed = train(tmp_path, "--steps", "8", "--resume")
    assert history(tmp_path) == history(out)  # bit for bit, every iteration
    assert f"(resumed at {stops[0]}, {stops[1]})" in resumed.stdout
    assert not (tmp_path / "preempted.json").exists()


def test_two_runs_into_one_out_the_second_is_refused_and_the_first_finishes_intact(
        full_run, tmp_path):
    import time

    out, _ = full_run
    cmd = [sys.executable, "-m", "megatron_c2r", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--out", str(tmp_path), "--no-progress",
           *TINY, "--steps", "8"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "data").exists() and time.monotonic() < deadline:  # first holds the lock
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = train(tmp_path, "--steps", "8", expect=2)
    _one_line_error(second, "in use by another run", f"pid {first.pid}", "another --out")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert history(tmp_path) == history(out)  # the first run is untouched by the second
    assert json.load(open(tmp_path / "summary.json"))["iterations"] == 8


def test_resume_with_a_drifted_config_is_one_line_naming_the_field(full_run, tmp_path):
    import shutil

    out, _ = full_run
    shutil.copytree(out, tmp_path / "run")
    proc = train(tmp_path / "run", "--steps", "9", "--resume", "--set", "megatron.moe-router-topk=2",
                 expect=2)
    _one_line_error(proc, "megatron.--moe-router-topk 4 -> 2", "another --out")


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-c2r train: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_resume_without_a_checkpoint_is_one_line_and_creates_nothing(tmp_path):
    out = tmp_path / "never"
    proc = train(out, "--steps", "8", "--resume", expect=2)
    _one_line_error(proc, "no complete checkpoint", "run without --resume")
    assert not out.exists()


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(full_run):
    out, _ = full_run
    _one_line_error(train(out, "--steps", "8", expect=2), "already holds checkpoints", "--resume")


def test_a_hostile_rank_file_fails_in_the_worker_and_reaches_the_parent_as_one_line(
        full_run, tmp_path):
    import shutil

    out, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ckpt = copy / "checkpoint" / "iter_0000008"
    rank1 = ckpt / "rank1.pt"
    rank1.write_bytes(b"\x80\x04cos\nsystem\n(S'touch PWNED'\ntR.")  # a pickle calling os.system
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["rank1.pt"] = rank1.stat().st_size  # a marker that vouches for it
    (ckpt / "meta.json").write_text(json.dumps(meta))
    proc = train(copy, "--steps", "9", "--resume", expect=2)
    _one_line_error(proc, str(rank1), "not a readable checkpoint")
    assert "weights_only" not in proc.stderr
    assert not os.path.exists(os.path.join(ROOT, "PWNED")) and (ckpt / "meta.json").exists()


def test_an_input_error_raised_in_a_worker_of_a_fresh_run_is_one_line_and_leaves_nothing(tmp_path):
    """c2r top-T routing with no warm-up and no lists is refused by the router at its first
    forward (inside a worker, after the data cache exists) unless the config layer already
    refuses it: either way one ValueError and no output directory."""
    from megatron_c2r.cpu.job_config import CPUTrainConfig
    from megatron_c2r.cpu.trainer import run
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.routing.config import C2RRouterConfig

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="warmup_steps") as info:
        cfg = CPUTrainConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_experts=8, topk=2,
            moe_ffn_hidden_size=32, seq_length=32, micro_batch_size=2, train_iters=4,
            eval_iters=1, corpus_bytes=200_000, out_dir=str(out), progress=False, plot=False,
            c2r=C2ROptions(router=C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=0)))
        run(cfg)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_a_corpus_too_small_for_the_validation_split_is_refused_up_front_not_a_hang(tmp_path):
    out = tmp_path / "run"
    proc = megatron_c2r("train", "--out", str(out), "--no-progress", "--steps", "4",
                        "--set", "c2r.warmup_steps=2", "--set", "cpu.corpus_bytes=2000", timeout=120)
    _one_line_error(proc, "cpu.corpus_bytes=2000 gives 1 documents", "raise cpu.corpus_bytes")
    assert not out.exists()


def test_the_baseline_runs_on_cpu_and_says_how(tmp_path):
    proc = train(tmp_path, "--steps", "4", "--set", "c2r.enabled=false", "--set", "cpu.plot=false")
    assert "CPU baseline (c2r.enabled: false)" in proc.stdout
    assert "Traceback" not in proc.stderr and "UserWarning" not in proc.stderr
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["mode"] == "megatron" and summary["iterations"] == 4
    assert summary["ranks_per_token"] > 1.0  # plain top-k: no constraint


@pytest.mark.parametrize("setting, words", [
    ("megatron.lr=.nan", "megatron.--lr=nan must be a finite number"),
    ("megatron.moe-grouped-gemm=true", "needs the grouped_gemm CUDA kernels"),
    ("c2r.dispatcher=megatron", "needs CUDA streams"),
])
def test_first_hour_settings_the_cpu_runner_cannot_run_are_one_line_before_anything(
        tmp_path, setting, words):
    out = tmp_path / "run"
    _one_line_error(train(out, "--steps", "4", "--set", setting, expect=2), words)
    assert not out.exists()
