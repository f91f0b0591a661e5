"""Checkpoints of the CPU main job: one directory per iteration, complete only once marked.

Layout, under ``OUT/checkpoint/``::

    iter_0000016/rank0.pt, rank1.pt   one file per rank (model incl. router/tracker state, AdamW
                                      state, iteration, RNG, placements; rank 0 also the history
                                      and the run clock), written with torch.save, read back with
                                      ``torch.load(weights_only=True)``
    iter_0000016/meta.json            the completion marker: iteration, world size, expert counts
                                      and every rank file's size

Save (``save``, collective over WORLD, every rank at the same iteration):
    1. rank 0 creates ``iter_N/`` (removing a stale one of the same iteration first); barrier;
    2. every rank writes ``rankR.pt.tmp`` in it, fsyncs it, renames it to ``rankR.pt`` and
       fsyncs the directory: the file is durable;
    3. an all-reduce gathers the file sizes, so it is also the barrier "every rank is durable";
    4. rank 0 writes ``meta.json`` the same way (temp, fsync, rename, fsync): from this moment the
       checkpoint counts; then it un-marks and removes checkpoints beyond the newest ``KEEP_LAST``.
A kill -9 at any moment therefore leaves the previous complete checkpoint untouched, plus at most
one unmarked directory and temp files, which ``prepare`` removes at the next start.

``KEEP_LAST`` is a constant (2): the newest checkpoint and the one before it, so a checkpoint that
turns out damaged on disk still leaves one to fall back to by deleting it.

Start-up (``prepare``, in the launching process, before any worker or megatron import): removes
orphaned temp files and unmarked directories, then for ``--resume`` picks the newest complete
checkpoint (a marked one whose rank files all have the recorded sizes; others are skipped with one
line each) and refuses with one line when there is none; a fresh run refuses an output directory
that still holds checkpoints, since its saves would mix with them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_c2r.cpu.job_config import run_identity
from megatron_c2r.files import disk_full

CKPT_DIR = "checkpoint"
META_FILE = "meta.json"
COLLAB_FILE = "collaboration.npy"  # the trackers' [L, E, E] counts, what `megatron-c2r plan` reads
KEEP_LAST = 2
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint problem the user fixes (one line naming the path and the fix)."""


@dataclass(frozen=True)
class Checkpoint:
    path: str  # OUT/checkpoint/iter_NNNNNNN
    iteration: int
    meta: Dict


def root_of(out_dir: str) -> str:
    return os.path.join(out_dir, CKPT_DIR)


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# -- durable writes ----------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _durable_file(path: str, mode: str):
    """Write through ``path.tmp``: flush + fsync, rename onto ``path``, fsync the directory. A
    full disk removes the temp file and raises ``files.DiskFullError`` (one line naming the path;
    the previous checkpoint is untouched, since the marker is written last)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports ENOSPC as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _caused_by_enospc(exc):
            raise disk_full(path) from None
        raise
    _fsync_dir(os.path.dirname(path))


def _caused_by_enospc(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_torch(obj, path: str) -> int:
    """torch.save ``obj`` to ``path`` durably; returns the file size."""
    with _durable_file(path, "wb") as f:
        torch.save(obj, f)
    return os.path.getsize(path)


def write_json(obj, path: str) -> int:
    with _durable_file(path, "w") as f:
        json.dump(obj, f, indent=1)
    return os.path.getsize(path)


def write_npy(array: np.ndarray, path: str) -> int:
    with _durable_file(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return os.path.getsize(path)


# -- save (collective) -------------------------------------------------------------------------
def save(trainer, extra_rank0: Optional[Dict] = None) -> str:
    """Write checkpoint ``iter_{trainer.iteration}`` (collective over WORLD; protocol in the module
    docstring). ``extra_rank0``: entries only rank 0's file holds (history, run clock). Side
    effects: every C2R tracker is reduced over WORLD first (rank-local counts would be lost
    across a resume otherwise); rank 0 rewrites ``OUT/collaboration.npy`` and prunes old
    checkpoints. Returns the checkpoint directory."""
    from megatron_c2r.moe.router import c2r_routers  # imports megatron: workers only

    routers = list(c2r_routers(trainer.model))
    for router in routers:
        router.tracker.reduce_()
    root = root_of(trainer.cfg.out_dir)
    path = iter_dir(root, trainer.iteration)
    if trainer.rank == 0:
        if os.path.isdir(path):  # an earlier, interrupted or superseded save of this iteration
            _remove_checkpoint_dir(path)
        os.makedirs(path)
        _fsync_dir(root)
    dist.barrier()
    state = {
        "iteration": trainer.iteration,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "placements": trainer.placements,
        **((extra_rank0 or {}) if trainer.rank == 0 else {}),
    }
    sizes_W = torch.zeros(trainer.world, dtype=torch.int64)
    sizes_W[trainer.rank] = write_torch(state, os.path.join(path, f"rank{trainer.rank}.pt"))
    dist.all_reduce(sizes_W)  # every rank's file is durable once this returns
    if trainer.rank == 0:
        cfg = trainer.cfg
        meta = {"iteration": trainer.iteration, "world_size": trainer.world,
                "num_experts": cfg.num_experts, "ep_size": cfg.ep_size,
                "identity": run_identity(cfg),
                "files": {f"rank{r}.pt": int(sizes_W[r]) for r in range(trainer.world)}}
        write_json(meta, os.path.join(path, META_FILE))
        if routers:  # [L, E, E] int64, in the model's current expert labelling
            counts_LEE = torch.stack([r.tracker.counts for r in routers]).cpu().numpy()
            write_npy(counts_LEE, os.path.join(cfg.out_dir, COLLAB_FILE))
        prune(root, KEEP_LAST)
    dist.barrier()
    return path


def _remove_checkpoint_dir(path: str) -> None:
    """Un-mark first, so a kill during the removal leaves an unmarked (ignored) directory."""
    marker = os.path.join(path, META_FILE)
    if os.path.exists(marker):
        os.remove(marker)
        _fsync_dir(path)
    shutil.rmtree(path)


def prune(root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove every older directory and every
    unmarked one (called by the saving rank after its marker is in place, while the other ranks
    wait: no save is in progress)."""
    complete, _ = scan(root)
    if not complete:
        return
    oldest_kept = complete[:keep][-1].iteration
    for it, path in _iter_dirs(root):
        if it < oldest_kept or not os.path.exists(os.path.join(path, META_FILE)):
            _remove_checkpoint_dir(path)


# -- discovery (no torch, no collectives) ------------------------------------------------------
def _iter_dirs(root: str) -> List[tuple]:
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def _check(path: str, iteration: int) -> Checkpoint:
    """The checkpoint in ``path`` if its marker and rank files agree; CheckpointError otherwise."""
    marker = os.path.join(path, META_FILE)
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{marker} is not a checkpoint marker ({type(exc).__name__})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if (not isinstance(files, dict) or not files or meta.get("iteration") != iteration
            or not all(isinstance(v, int) for v in files.values())):
        raise CheckpointError(
            f"{marker} is not a marker this job wrote (expected iteration {iteration} and the "
            "rank file sizes)")
    for name, size in sorted(files.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have != size:
            raise CheckpointError(
                f"{file} has {'no file' if have is None else f'{have} bytes'} but {META_FILE} "
                f"recorded {size} bytes: the set is incomplete or mixed")
    return Checkpoint(path, iteration, meta)


def scan(root: str) -> tuple:
    """(complete checkpoints newest first, [one-line reason per marked but unusable directory])."""
    complete, problems = [], []
    for it, path in _iter_dirs(root):
        if not os.path.exists(os.path.join(path, META_FILE)):
            continue  # unmarked: an interrupted save (removed by ``clean``)
        try:
            complete.append(_check(path, it))
        except CheckpointError as exc:
            problems.append((path, str(exc)))
    return complete, problems


def clean(root: str) -> List[str]:
    """Remove what interrupted saves leave: ``*.tmp`` files and unmarked ``iter_*`` directories.
    Call only while no job writes ``root``. Returns the removed paths."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for it, path in _iter_dirs(root):
        if not os.path.exists(os.path.join(path, META_FILE)):
            shutil.rmtree(path)
            removed.append(path)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if ".tmp" in name:  # rank*.pt.tmp, meta.json.tmp (and the older rank*.pt.tmp<pid>)
                os.remove(os.path.join(dirpath, name))
                removed.append(os.path.join(dirpath, name))
    return removed


def prepare(out_dir: str, *, resume: bool, world_size: int, num_experts: int,
            ep_size: int, identity: Optional[Dict] = None, train_iters: Optional[int] = None,
            log=print) -> Optional[Checkpoint]:
    """Start-up in the launching process: clean, then the checkpoint to resume from (``resume``)
    or None (a fresh run). One line per removed leftover / skipped checkpoint goes to ``log``;
    CheckpointError (one line) when nothing can be resumed, a fresh run would mix with old
    checkpoints, the checkpoint's run identity (``job_config.run_identity``) differs from
    ``identity``, or ``train_iters`` leaves nothing to train."""
    root = root_of(out_dir)
    removed = clean(root)
    if removed:
        log(f"removed {len(removed)} leftover(s) of an interrupted save under {root}: "
            + ", ".join(os.path.relpath(p, root) for p in removed[:4])
            + (" ..." if len(removed) > 4 else ""))
    complete, problems = scan(root)
    if not resume:
        if complete or problems:
            newest = complete[0].iteration if complete else _iter_dirs(root)[0][0]
            raise CheckpointError(
                f"--out {out_dir} already holds checkpoints (newest: iteration {newest}): pass "
                f"--resume to continue them, or choose a new --out (or delete {root}) to start "
                "over")
        return None
    chosen = complete[0] if complete else None
    if chosen is None:
        why = f" ({problems[0][1]})" if problems else ""
        raise CheckpointError(
            f"--resume: no complete checkpoint under {root}{why}: run without --resume to start "
            "over, or restore the checkpoint files")
    for path, reason in problems:
        if path > chosen.path:  # same-width names: newer than the one resumed
            log(f"--resume: skipped {path}: {reason}")
    meta = chosen.meta
    for key, want in (("world_size", world_size), ("num_experts", num_experts),
                      ("ep_size", ep_size)):
        if meta.get(key) != want:
            raise CheckpointError(
                f"--resume: {chosen.path} has {key}={meta.get(key)} but this run has "
                f"{key}={want}: resume with the config that wrote it")
    saved = meta.get("identity")
    if identity is not None and saved is None:
        log(f"--resume: {chosen.path} predates stored run identities: its config is not checked")
    elif identity is not None and saved != identity:
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise CheckpointError(
            f"--resume: {chosen.path} was written by a different run ({shown}{more}): resume with "
            "the config that wrote it, or start a new run with another --out (steps, intervals "
            "and logging may change: docs/config.md)")
    if train_iters is not None and train_iters <= chosen.iteration:
        raise CheckpointError(
            f"--resume: {chosen.path} is at iteration {chosen.iteration} and --steps/"
            f"megatron.train-iters is {train_iters}: nothing left to train; pass --steps N with "
            f"N > {chosen.iteration}")
    return chosen


# -- load (one rank) ---------------------------------------------------------------------------
def load_rank_state(ckpt: Checkpoint, rank: int) -> Dict:
    """This rank's state from ``ckpt``, read with ``weights_only=True``. CheckpointError (one line,
    never torch's message, which suggests weights_only=False) for a file that is truncated, empty,
    not ours or from another iteration."""
    path = os.path.join(ckpt.path, f"rank{rank}.pt")
    fix = (f"delete {ckpt.path} to resume from the checkpoint before it, or run without --resume")
    try:
        with warnings.catch_warnings():  # torch's notice on foreign pickles: our line says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {fix}") from None
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...: all one cause
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: truncated, empty or "
            f"holding objects other than tensors): {fix}") from None
    keys = ("iteration", "model", "optimizer", "torch_rng", "placements")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CheckpointError(f"{path} lacks the CPU job's checkpoint entries {keys}: {fix}")
    if state["iteration"] != ckpt.iteration:
        raise CheckpointError(
            f"{path} is from iteration {state['iteration']}, its directory from "
            f"{ckpt.iteration}: a mixed set; {fix}")
    return state

