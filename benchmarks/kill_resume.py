"""Kill -9 the CPU main job in the middle of its checkpoint saves, resume, and compare losses.

    python benchmarks/kill_resume.py --tries 20          # ~10 s per try on 2 free cores

A tiny configuration of ``configs/tiny_cpu.yaml`` (``TINY``) saves a checkpoint every step. First
one uninterrupted run gives the reference losses. Then each try:

1. starts ``megatron-c2r train`` in its own process group (fresh, or ``--resume`` continuing the
   previous try's output directory);
2. picks a save at random among those still ahead, waits until it has begun (its ``iter_N``
   directory appears), waits a random 0-40 ms more, and sends SIGKILL to the whole group;
3. checks what is on disk: no marked checkpoint is inconsistent, and the newest complete one
   loads on every rank (``torch.load(weights_only=True)``) with the marker's iteration; it notes
   what the kill left behind (an unmarked directory, temp files).
When a chain of tries reaches the last save, ``--resume`` runs it to the end; its losses must
equal the reference's at every iteration (bit for bit, as parsed from ``history.csv``) and no
leftover may remain. The next try starts a new chain in a new directory.

Prints one line per try and a summary; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_c2r.cpu import checkpoint  # noqa: E402  (after the sys.path line: run as a script)

TINY = [
    "megatron.num-layers=2", "megatron.hidden-size=64", "megatron.ffn-hidden-size=128",
    "megatron.moe-ffn-hidden-size=64", "megatron.seq-length=64",
    "megatron.max-position-embeddings=64", "megatron.micro-batch-size=4",
    "megatron.eval-iters=2", "megatron.log-interval=2", "megatron.lr-warmup-iters=2",
    "c2r.warmup_steps=3", "cpu.corpus_bytes=300000",
]
KILL_DELAY_S = 0.040  # upper end of the random wait after a save began (a save takes ~10-50 ms)


def command(out_dir: str, steps: int, sets: List[str], resume: bool) -> List[str]:
    cmd = [sys.executable, "-m", "megatron_c2r", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--out", out_dir, "--steps", str(steps),
           "--no-progress", "--set", "megatron.save-interval=1"]
    for item in sets:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def run_to_end(out_dir: str, steps: int, sets: List[str], resume: bool) -> None:
    proc = subprocess.run(command(out_dir, steps, sets, resume), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"run in {out_dir} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def history_losses(out_dir: str) -> Dict[int, float]:
    with open(os.path.join(out_dir, "history.csv"), newline="", encoding="utf-8") as f:
        return {int(r["iteration"]): float(r["loss"]) for r in csv.DictReader(f)}


def leftovers(out_dir: str) -> List[str]:
    """Unmarked checkpoint directories and temp files under OUT/checkpoint."""
    root = checkpoint.root_of(out_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath != root and not os.path.exists(os.path.join(dirpath, checkpoint.META_FILE)):
            found.append(os.path.relpath(dirpath, root) + "/")
        found += [os.path.relpath(os.path.join(dirpath, n), root) for n in filenames if ".tmp" in n]
    return sorted(found)


def newest_loads_on_every_rank(out_dir: str, world: int) -> Optional[int]:
    """Iteration of the newest complete checkpoint after loading each rank's file (None if there
    is none yet); AssertionError if a marked checkpoint is inconsistent or a file fails."""
    complete, problems = checkpoint.scan(checkpoint.root_of(out_dir))
    assert not problems, problems
    if not complete:
        return None
    for rank in range(world):
        state = checkpoint.load_rank_state(complete[0], rank)
        assert state["iteration"] == complete[0].iteration, (rank, state["iteration"])
    return complete[0].iteration


def kill_during_a_save(out_dir: str, steps: int, sets: List[str], resume_from: Optional[int],
                       rng: random.Random, log_path: str) -> Dict:
    """Start a run, SIGKILL its process group while save ``target`` is under way."""
    first = (resume_from or 0) + 1
    target = rng.randint(first, steps - 1)
    delay = rng.uniform(0.0, KILL_DELAY_S)
    target_dir = checkpoint.iter_dir(checkpoint.root_of(out_dir), target)
    with open(log_path, "w", encoding="utf-8") as log:
        # A directory of that iteration left by the previous kill goes first (the run's start-up
        # removes it, seconds before its workers save anything): wait for it to vanish, then
        # for the one this run's save creates.
        stale = os.path.isdir(target_dir)
        proc = subprocess.Popen(command(out_dir, steps, sets, resume_from is not None), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            exists = os.path.isdir(target_dir)
            if exists and not stale:
                break
            stale = stale and exists
            time.sleep(0.001)
        killed = proc.poll() is None
        if killed:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"target": target, "delay_ms": round(1000 * delay, 1), "killed": killed,
            "returncode": proc.returncode}


def run_tries(out_root: str, tries: int, *, steps: int = 8, sets: Optional[List[str]] = None,
              world: int = 2, seed: int = 0, reference: Optional[Dict[int, float]] = None,
              log=print) -> Dict:
    """``tries`` kills in chains of resumed runs (module docstring). ``reference``: the
    uninterrupted losses, {iteration: loss} (default: run once here). Returns a summary dict with
    ``failures`` (one string each)."""
    sets = TINY if sets is None else sets
    rng = random.Random(seed)
    if reference is None:
        ref_dir = os.path.join(out_root, "reference")
        run_to_end(ref_dir, steps, sets, resume=False)
        reference = history_losses(ref_dir)
    failures, results, chains = [], [], 0
    out_dir, resume_from = None, None
    for i in range(tries):
        if out_dir is None:
            chains += 1
            out_dir, resume_from = os.path.join(out_root, f"chain{chains}"), None
        try_log = os.path.join(out_root, f"try{i + 1}.log")
        r = kill_during_a_save(out_dir, steps, sets, resume_from, rng, try_log)
        r["left"] = leftovers(out_dir)
        try:
            r["newest_complete"] = newest_loads_on_every_rank(out_dir, world)
        except (AssertionError, ValueError) as exc:
            failures.append(f"try {i + 1}: newest checkpoint does not load: {exc}")
            r["newest_complete"] = None
        if not r["killed"]:
            failures.append(f"try {i + 1}: the run ended before save {r['target']} "
                            f"(exit {r['returncode']}; log {try_log})")
        what = (f"kill {r['delay_ms']:4.1f} ms into save {r['target']:2d}" if r["killed"] else
                f"the run ended by itself (exit {r['returncode']}) before save {r['target']:2d}")
        log(f"try {i + 1:3d} chain {chains}: {what} -> newest complete {r['newest_complete']}, "
            f"left {', '.join(r['left']) or 'nothing'}")
        results.append(r)
        if r["newest_complete"] is not None:
            resume_from = r["newest_complete"]
        if i + 1 == tries or (resume_from or 0) >= steps - 1:
            failures += finish_chain(out_dir, steps, sets, resume_from, reference, chains)
            out_dir = None
    summary = {
        "tries": tries, "chains": chains,
        "killed_mid_save": sum(bool(r["left"]) for r in results),
        "killed_after_a_save": sum(r["killed"] and not r["left"] for r in results),
        "failures": failures,
    }

    def verdict(word):
        return "NO" if any(word in f for f in failures) else "yes"

    log(f"{tries} kills in {chains} chains: {summary['killed_mid_save']} left an interrupted "
        f"save behind, {summary['killed_after_a_save']} nothing; the newest complete checkpoint "
        f"loaded on every rank after each kill: {verdict('does not load')}; resumed losses equal "
        f"the uninterrupted run's: {verdict('loss')}; failures: {len(failures)}")
    for failure in failures:
        log(f"FAIL {failure}")
    return summary


def finish_chain(out_dir: str, steps: int, sets: List[str], resume_from: Optional[int],
                 reference: Dict[int, float], chain: int) -> List[str]:
    """Run the chain to the end and compare with the reference; failures as strings."""
    run_to_end(out_dir, steps, sets, resume=resume_from is not None)
    failures = []
    resumed = history_losses(out_dir)
    if sorted(resumed) != sorted(reference):
        failures.append(f"chain {chain}: history has iterations {sorted(resumed)}, the "
                        f"uninterrupted run {sorted(reference)}")
    diff = [it for it in reference if it in resumed and resumed[it] != reference[it]]
    if diff:
        failures.append(f"chain {chain}: loss differs from the uninterrupted run at {diff}")
    left = leftovers(out_dir)
    if left:
        failures.append(f"chain {chain}: leftovers remain after the resumed run: {left}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=20, help="kills (default 20)")
    ap.add_argument("--steps", type=int, default=12,
                    help="steps per run, one save each (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    ap.add_argument("--out", help="working directory (default: a new temporary one, kept)")
    args = ap.parse_args(argv)
    if args.tries < 1 or args.steps < 3:
        ap.error(f"--tries {args.tries} must be >= 1 and --steps {args.steps} >= 3")
    out_root = args.out or tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(out_root, exist_ok=True)
    print(f"kill_resume: {args.tries} tries, {args.steps} steps per run, in {out_root}", flush=True)
    summary = run_tries(out_root, args.tries, steps=args.steps, seed=args.seed,
                        log=lambda m: print(m, flush=True))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
