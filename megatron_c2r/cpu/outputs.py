"""What the CPU main job shows and writes: progress bar, TensorBoard events, metrics CSV, history,
summary, PNG plot and checkpoints (atomic: temp file + rename; read back with
``weights_only=True``)."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, Optional

import torch

CKPT_DIR = "checkpoint"


# -- progress --------------------------------------------------------------------------------
def progress_bar(cfg, start: int):
    from tqdm import tqdm

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


# -- checkpoints -----------------------------------------------------------------------------
def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(trainer) -> None:
    """Per-rank file ``checkpoint/rank{r}.pt`` (model incl. router state, optimizer, iteration,
    RNG) and, from rank 0, ``checkpoint/meta.json`` written last: a checkpoint is complete when
    meta.json names its iteration."""
    import torch.distributed as dist

    ckpt_dir = os.path.join(trainer.cfg.out_dir, CKPT_DIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    # Rank-local tracker counts would be lost across a resume otherwise.
    from megatron_c2r.moe.router import c2r_routers

    for router in c2r_routers(trainer.model):
        router.tracker.reduce_()
    state = {
        "iteration": trainer.iteration,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "placements": trainer.placements,
    }
    _atomic_save(state, os.path.join(ckpt_dir, f"rank{trainer.rank}.pt"))
    dist.barrier()
    if trainer.rank == 0:
        meta = {"iteration": trainer.iteration, "world_size": trainer.world,
                "num_experts": trainer.cfg.num_experts, "ep_size": trainer.cfg.ep_size}
        tmp = os.path.join(ckpt_dir, "meta.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(ckpt_dir, "meta.json"))
    dist.barrier()


def load_checkpoint(trainer) -> None:
    ckpt_dir = os.path.join(trainer.cfg.out_dir, CKPT_DIR)
    meta_path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"--resume: no complete checkpoint at {ckpt_dir} (meta.json missing): run without "
            "--resume first"
        )
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    for key in ("world_size", "num_experts", "ep_size"):
        want = trainer.world if key == "world_size" else getattr(trainer.cfg, key)
        if meta.get(key) != want:
            raise ValueError(
                f"--resume: checkpoint {key}={meta.get(key)} but this run has {key}={want}: "
                "resume with the config that wrote it"
            )
    state = torch.load(os.path.join(ckpt_dir, f"rank{trainer.rank}.pt"), weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    trainer.iteration = int(state["iteration"])
    trainer.placements = state["placements"]
    hist = os.path.join(trainer.cfg.out_dir, "history.csv")
    if trainer.rank == 0 and os.path.exists(hist):
        with open(hist, newline="", encoding="utf-8") as f:
            trainer.history = [
                {k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)
                if int(float(row["iteration"])) <= trainer.iteration
            ]


# -- the end ---------------------------------------------------------------------------------
def finish(trainer, *, val_loss: float, elapsed_s: float, tokens: int, last_metrics: Dict,
           writer, config: Dict) -> Dict:
    cfg = trainer.cfg
    out = cfg.out_dir
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
        "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else float("nan"),
        "elapsed_s": elapsed_s,
        "warmup_steps": cfg.c2r.router.warmup_steps if cfg.c2r.enabled else 0,
        "mode": cfg.c2r.router.mode if cfg.c2r.enabled else "megatron",
        "corpus": {"documents": trainer.corpus.num_documents, "tokens": trainer.corpus.num_tokens,
                   "fingerprint": trainer.corpus.fingerprint},
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
    return (
        f"megatron-c2r tiny CPU pretraining ({s['mode']}): {s['iterations']} steps in "
        f"{s['elapsed_s']:.0f} s | train loss {s['train_loss']:.3f} | val loss {s['val_loss']:.3f}"
        f" | ranks/token {s['ranks_per_token']:.2f} vs alltoall {s['rows_per_token_alltoall']:.0f}"
        f" rows/token ({s['row_reduction']:.1f}x fewer rows) | {s['tokens_per_s'] / 1000:.1f}k tokens/s"
    )


def _write_history(history, path: str) -> None:
    if not history:
        return
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "iteration", k))
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in keys})
    os.replace(tmp, path)


def plot_history(history, summary: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    its = [r["iteration"] for r in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(its, [r["loss"] for r in history], lw=1, label="train loss")
    ax1.set_ylabel("loss")
    ax1.set_title(f"tiny C2R pretraining on CPU ({summary['mode']}): val loss {summary['val_loss']:.3f}")
    pts = [(r["iteration"], r["ranks_per_token"], r.get("rows_per_token_alltoall", float("nan")))
           for r in history if "ranks_per_token" in r and not math.isnan(r["ranks_per_token"])]
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="ours: rows/token (ranks/token)")
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "--", label="Megatron alltoall: rows/token (k)")
    ax2.set_ylabel("rows shipped per token")
    ax2.set_xlabel("iteration")
    ax2.set_ylim(bottom=0)
    warm = summary.get("warmup_steps") or 0
    for ax in (ax1, ax2):
        if warm:
            ax.axvline(warm, color="gray", ls=":", label="warm-up ends: plan + constrain")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


