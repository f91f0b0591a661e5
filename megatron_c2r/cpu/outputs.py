"""What the CPU main job shows and writes: progress bar, TensorBoard events, metrics CSV, history,
summary and PNG plot (each written atomically: temp file + rename). Checkpoints and the
trackers' counts: ``cpu.checkpoint``."""

from __future__ import annotations

import csv
import json
import math
import os
import threading
from typing import Dict, List, Optional

INT_COLUMNS = ("iteration", "constrained")  # history.csv columns written as integers
# Balance columns of the history and summary: the busiest EP rank's / node's load over the mean
# over every rank's tokens (megatron_c2r.metrics LOAD_NAMES), tokens = expert input rows.
BALANCE = {
    "busiest_rank_tokens_over_mean": "busiest rank (expert input rows)",
    "busiest_rank_rows_over_mean": "busiest rank (received rows)",
    "busiest_node_tokens_over_mean": "busiest node (expert input rows)",
    "busiest_node_rows_over_mean": "busiest node (received rows)",
}


# -- progress --------------------------------------------------------------------------------
def progress_bar(cfg, start: int):
    """Rank 0's bar. tqdm's default lock is a multiprocessing semaphore, which a worker stopped by
    SIGTERM (after another worker's error) would leak with a warning; one bar in one process
    needs only a thread lock."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    return tqdm(total=cfg.train_iters, initial=start, desc="c2r pretraining", unit="step",
                disable=not cfg.progress, dynamic_ncols=True)


def update_bar(bar, loss: float, metrics: Dict[str, float], tokens_per_s: float) -> None:
    if bar is None:
        return
    rpt = metrics.get("moe/c2r/ranks_per_token", float("nan"))
    a2a = metrics.get("moe/c2r/rows_per_token_alltoall", float("nan"))
    bar.set_postfix_str(
        f"loss {loss:.3f} | ranks/token {rpt:.2f} | rows vs alltoall {rpt:.2f}/{a2a:.0f}"
        f" | {tokens_per_s / 1000:.1f}k tok/s", refresh=False)
    bar.update(1)


def tensorboard_writer(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra ("viz")
        return None
    return SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))


# -- metrics CSV ------------------------------------------------------------------------------
def trim_metrics_csv(path: str, iteration: int) -> None:
    """Keep the rows of ``metrics.csv`` (appended to by ``C2RMetrics.report``) up to
    ``iteration``: a resumed run repeats the steps after its checkpoint, a fresh run (0) starts
    the file over. Atomic (temp + rename)."""
    if not os.path.exists(path):
        return
    if iteration == 0:
        os.remove(path)
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= iteration]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:1] + kept)
    os.replace(tmp, path)


# -- the end ---------------------------------------------------------------------------------
def finish(trainer, *, val_loss: float, segments: List[Dict], last_metrics: Dict,
           writer, config: Dict) -> Dict:
    """Write history.csv, summary.json (and the plot); print the summary line. ``segments``:
    every run of this job that led to the final state ({start, end iteration, seconds}, the
    steps a kill undid not counted): steps, time and tokens/s are over all of them."""
    cfg = trainer.cfg
    out = cfg.out_dir
    segments = [s for s in segments if s["end"] > s["start"]] or segments[-1:]
    elapsed_s = sum(s["elapsed_s"] for s in segments)
    tokens = sum(s["end"] - s["start"] for s in segments) * cfg.tokens_per_step
    _write_history(trainer.history, os.path.join(out, "history.csv"))
    rpt = last_metrics.get("moe/c2r/ranks_per_token", float("nan"))
    a2a = last_metrics.get("moe/c2r/rows_per_token_alltoall", float(cfg.topk))
    train_loss = trainer.history[-1]["loss"] if trainer.history else float("nan")
    summary = {
        "iterations": trainer.iteration,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "ranks_per_token": rpt,
        "rows_per_token_alltoall": a2a,
        "row_reduction": a2a / rpt if rpt and not math.isnan(rpt) else float("nan"),
        **{name: last_metrics.get(f"moe/c2r/{name}", float("nan")) for name in BALANCE},
        "nodes": _nodes(cfg),
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else float("nan"),
        "elapsed_s": elapsed_s,
        "resumed_at": [seg["start"] for seg in segments[1:]],
        "segments": segments,
        "warmup_steps": cfg.c2r.router.warmup_steps if cfg.c2r.enabled else 0,
        "mode": cfg.c2r.router.mode if cfg.c2r.enabled else "megatron",
        "corpus": {"documents": trainer.corpus.num_documents, "tokens": trainer.corpus.num_tokens,
                   "fingerprint": trainer.corpus.fingerprint, "source": cfg.corpus,
                   "differs_from_reference": trainer.corpus.note},
        "metrics": {k: v for k, v in last_metrics.items() if "_layer_" not in k},
        "config": config,
    }
    summary["summary_line"] = summary_line(summary)
    if writer is not None:
        writer.add_scalar("validation loss", val_loss, trainer.iteration)
        writer.flush()
        writer.close()
    if cfg.plot:
        summary["plot"] = plot_history(trainer.history, summary, os.path.join(out, "training.png"))
    tmp = os.path.join(out, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out, "summary.json"))
    print(summary["summary_line"], flush=True)
    return summary


def summary_line(s: Dict) -> str:
    resumed = s.get("resumed_at") or []
    where = f" (resumed at {', '.join(map(str, resumed))})" if resumed else ""
    nan = float("nan")
    balance = (
        f" | busiest rank {s.get('busiest_rank_tokens_over_mean', nan):.2f}x mean load"
        f" ({s.get('busiest_rank_rows_over_mean', nan):.2f}x rows)"
    )
    if (s.get("nodes") or 1) > 1:
        balance += (
            f", busiest node {s.get('busiest_node_tokens_over_mean', nan):.2f}x"
            f" ({s.get('busiest_node_rows_over_mean', nan):.2f}x rows)"
        )
    return (
        f"megatron-c2r tiny CPU pretraining ({s['mode']}): {s['iterations']} steps in "
        f"{s['elapsed_s']:.0f} s{where} | train loss {s['train_loss']:.3f} | val loss {s['val_loss']:.3f}"
        f" | ranks/token {s['ranks_per_token']:.2f} vs alltoall {s['rows_per_token_alltoall']:.0f}"
        f" rows/token ({s['row_reduction']:.1f}x fewer rows){balance}"
        f" | {s['tokens_per_s'] / 1000:.1f}k tokens/s"
        + (f" | corpus {s['corpus']['fingerprint']}" if s.get("corpus") else "")
    )


def _nodes(cfg) -> int:
    """Nodes the CPU job's EP ranks are simulated on (``c2r.gpus_per_node``; else one)."""
    per_node = cfg.c2r.gpus_per_node if cfg.c2r.enabled else None
    return max(1, cfg.ep_size // per_node) if per_node else 1


def _write_history(history, path: str) -> None:
    if not history:
        return
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "iteration", k))
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: int(row[k]) if k in INT_COLUMNS and k in row else row.get(k, "")
                             for k in keys})
    os.replace(tmp, path)


def plot_history(history, summary: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    its = [r["iteration"] for r in history]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    ax1.plot(its, [r["loss"] for r in history], lw=1, label="train loss")
    ax1.set_ylabel("loss")
    ax1.set_title(f"tiny C2R pretraining on CPU ({summary['mode']}): val loss {summary['val_loss']:.3f}")
    pts = [(r["iteration"], r["ranks_per_token"], r.get("rows_per_token_alltoall", float("nan")))
           for r in history if "ranks_per_token" in r and not math.isnan(r["ranks_per_token"])]
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="ours: rows/token (ranks/token)")
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "--", label="Megatron alltoall: rows/token (k)")
    ax2.set_ylabel("rows shipped per token")
    ax2.set_ylim(bottom=0)
    shown = [n for n in BALANCE if "node" not in n or (summary.get("nodes") or 1) > 1]
    for name in shown:
        pts = [(r["iteration"], r[name]) for r in history
               if not math.isnan(r.get(name, float("nan")))]  # fmt: skip
        if pts:
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=BALANCE[name])
    ax3.axhline(1.0, color="gray", lw=0.8)
    ax3.set_ylabel("load / mean")
    ax3.set_xlabel("iteration")
    warm = summary.get("warmup_steps") or 0
    for ax in (ax1, ax2, ax3):
        if warm:
            ax.axvline(warm, color="gray", ls=":", label="warm-up ends: plan + constrain")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


