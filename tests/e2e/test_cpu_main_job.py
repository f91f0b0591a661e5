"""The README's first command, shrunk: `megatron-c2r train` end to end in real subprocesses
(2 gloo ranks each), its outputs, and `--resume`."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--set", "megatron.num-layers=2", "--set", "megatron.hidden-size=64",
    "--set", "megatron.ffn-hidden-size=128", "--set", "megatron.moe-ffn-hidden-size=64",
    "--set", "megatron.seq-length=64", "--set", "megatron.max-position-embeddings=64",
    "--set", "megatron.micro-batch-size=4", "--set", "megatron.eval-iters=2",
    "--set", "megatron.log-interval=2", "--set", "megatron.lr-warmup-iters=2",
    "--set", "c2r.warmup_steps=3", "--set", "cpu.corpus_bytes=300000",
]


def train(out_dir, *extra):
    cmd = [sys.executable, "-m", "megatron_c2r", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--out", str(out_dir),
           "--no-progress", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def history(out_dir):
    with open(os.path.join(out_dir, "history.csv"), newline="") as f:
        return {int(float(r["iteration"])): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = train(out, "--steps", "8")
    return out, proc


def test_the_main_job_writes_every_output_and_ships_fewer_rows_than_alltoall(full_run):
    out, proc = full_run
    for name in ("summary.json", "history.csv", "metrics.csv", "training.png",
                 "checkpoint/meta.json", "checkpoint/rank0.pt", "checkpoint/rank1.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert "megatron-c2r tiny CPU pretraining" in proc.stdout
    assert summary["iterations"] == 8
    # After the warm-up the anchored group rule (M=1) puts every token on one rank.
    assert summary["ranks_per_token"] < summary["config"]["topk"]
    assert summary["ranks_per_token"] == pytest.approx(1.0)
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        names = {row["metric"] for row in csv.DictReader(f)}
    assert {"moe/c2r/ranks_per_token", "moe/c2r/rows_per_token_alltoall"} <= names


def test_resume_gives_the_same_next_step_loss_as_an_uninterrupted_run(full_run, tmp_path):
    out, _ = full_run
    train(tmp_path, "--steps", "8", "--exit-after", "5")
    train(tmp_path, "--steps", "8", "--resume")
    resumed, uninterrupted = history(tmp_path), history(out)
    for it in (6, 7, 8):
        assert resumed[it] == pytest.approx(uninterrupted[it], rel=1e-5, abs=1e-6), it
