"""The CPU main job: tiny real C2R MoE pretraining on gloo, one command.

    megatron-c2r train --config configs/tiny_cpu.yaml [--steps N] [--out DIR] [--resume]

What happens (each rank = one gloo process = one EP rank; EP = data parallel here):
    1. Build Megatron's GPTModel with our router and dedup dispatcher via the layer spec.
    2. Build the byte corpus (Python stdlib sources) as a Megatron IndexedDataset, GPTDatasets
       (cached in ``OUT/data/``).
    3. Warm-up: plain top-k routing while each router's tracker counts co-activation.
    4. At the end of the warm-up: sum the trackers over ranks, plan a collaboration-aware
       placement per layer, relabel experts across ranks (weights + optimizer state move with one
       all-to-all), then the routers turn the C2R constraint on (anchored group mode by default:
       every token's experts on one rank). With ``c2r.refresh_interval`` R, the placement is
       re-planned the same way at the end of every R-step window, from what plain top-k would
       have picked during it.
    5. Train on: AdamW, warm-up + cosine LR, gradient clipping. A progress bar shows loss,
       ranks/token (rows our dispatcher ships per token), rows vs alltoall, tokens/s.
    6. At the end: validation loss, a summary line, metrics CSV, TensorBoard events, a PNG plot,
       the trackers' counts for ``megatron-c2r plan`` and a checkpoint (``cpu.checkpoint``: one
       directory per iteration, complete once marked); ``--resume`` continues from the newest
       complete one with identical routing.

The launching process (``run``) imports torch only; megatron is imported in the workers, after
their warning filters are in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

# Light on purpose (torch only): the launching process never imports megatron, and each worker
# installs its warning filters before it does (see ``_quiet_megatron_fallbacks``).
from megatron_c2r.cpu import checkpoint, outputs
from megatron_c2r.cpu.job_config import CPUTrainConfig, as_dict, run_identity
from megatron_c2r.errors import USER_ERRORS, one_line

SUMMARY_FILE = "summary.json"
EXIT_INPUT_ERROR = 2  # a worker's input error (errors.USER_ERRORS), reported to the launcher
ERROR_KEY = "megatron_c2r/input_error/"  # + rank: that worker's one-line message, in the store
CPU_PATH_LINE = ("CPU runner: {n} gloo processes; Megatron-core's local layers with torch norms, "
                 "torch.optim.AdamW (no Transformer Engine, Apex or CUDA graphs needed)")

BASELINE_LINE = ("CPU baseline (c2r.enabled: false): Megatron's top-k routing (our router in "
                 "topk mode) through the dedup dispatcher; Megatron's alltoall dispatcher needs "
                 "CUDA streams, and the two are tested equal (outputs and gradients)")


class WorkerError(ValueError):
    """A worker's input error (``errors.USER_ERRORS``), re-raised in the launching process with
    the worker's one-line message, so the CLI's handler prints it and exits 2."""


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------
def run(cfg: CPUTrainConfig, *, resume: bool = False, exit_after: Optional[int] = None) -> Dict:
    """Spawn ``cfg.ep_size`` gloo processes, train, and return rank 0's summary dict.

    Before anything is spawned (and before megatron is imported anywhere): the output directory
    is checked and created, leftovers of interrupted saves are removed and the checkpoint to
    resume from is chosen (``checkpoint.prepare``); problems are one-line ValueErrors. A
    worker's input error (``errors.USER_ERRORS``) comes back as ``WorkerError`` with the same
    one-line message, after the other workers are stopped and whatever this run created is
    removed (unless it completed a checkpoint: then its directory stays, to resume).

    This process hosts the rendezvous store on a port the OS assigns (no pick-a-free-port race
    when several jobs start at once); the workers connect to it as clients."""
    out = cfg.out_dir
    created_out = _make_out_dir(out)
    with OutDirLock(out):  # one run per output directory; refused in one line while held
        try:
            resume_from = checkpoint.prepare(
                out, resume=resume, world_size=cfg.ep_size, num_experts=cfg.num_experts,
                ep_size=cfg.ep_size, identity=run_identity(cfg), train_iters=cfg.train_iters,
                log=_notice)
            _check_corpus_splits(cfg)
        except ValueError:
            if created_out:  # ours alone: we created it and hold its lock (a run that comes
                shutil.rmtree(out, ignore_errors=True)  # after finds no lock file and stops)
            raise
        created_data = not os.path.exists(os.path.join(out, "data"))
        print(CPU_PATH_LINE.format(n=cfg.ep_size), flush=True)
        if not cfg.c2r.enabled:
            print(BASELINE_LINE, flush=True)
        _spawn_workers(cfg, resume_from, exit_after, created_out, created_data)
        stopped_at = _preempted_at(out)
        if stopped_at is not None:
            raise Preempted(stopped_at, out)
    with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as f:
        return json.load(f)


# The 95/5 train/validation split by document needs this many documents for a non-empty
# validation split (Megatron's dataset code waits for ever on an empty one).
MIN_CORPUS_DOCUMENTS = 20


def _check_corpus_splits(cfg: CPUTrainConfig) -> None:
    from megatron_c2r.cpu.data import corpus_files  # torch and numpy only

    files, _ = corpus_files(cfg.corpus_bytes, cfg.corpus)
    if len(files) < MIN_CORPUS_DOCUMENTS:
        raise ValueError(
            f"cpu.corpus_bytes={cfg.corpus_bytes} gives {len(files)} documents, too few for the "
            f"95/5 train/validation split (at least {MIN_CORPUS_DOCUMENTS}, one validation "
            "document): raise cpu.corpus_bytes (e.g. 200000)")


def _spawn_workers(cfg: CPUTrainConfig, resume_from, exit_after, created_out, created_data) -> None:
    """Run the workers and wait. SIGTERM, SIGINT and SIGUSR1 reaching this process (SLURM's
    preemption or time-limit signal, Ctrl-C) are forwarded to the workers, which finish the step,
    checkpoint together and stop (``Trainer.train``)."""
    import torch.multiprocessing as mp

    out = cfg.out_dir
    _clear_preempted(out)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    spawn_log.addFilter(_drop_terminating_notice)  # we stop the other workers on purpose
    previous = {}
    try:
        context = mp.spawn(_worker, args=(cfg, store.port, resume_from, exit_after),
                           nprocs=cfg.ep_size, join=False)

        def forward(signum, _frame):
            for proc in context.processes:
                if proc.is_alive():
                    os.kill(proc.pid, signum)

        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, forward)
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        message = _reported_error(store, cfg.ep_size)
        if message is None:
            raise  # not an input error: a bug or a crash, keep the traceback
        _remove_created(out, created_out, created_data)
        raise WorkerError(message) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        spawn_log.removeFilter(_drop_terminating_notice)
        del store


# Signals that stop a run cleanly: finish the step, checkpoint on every rank, exit EXIT_PREEMPTED.
# SIGTERM: SLURM preemption / scancel, and what launch/lib.sh forwards; SIGUSR1: sbatch's
# --signal=B:USR1@... time-limit warning; SIGINT: Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# "Stopped on request after a complete checkpoint: requeue and --resume". EX_TEMPFAIL from
# sysexits.h; launch scripts treat it as a requeue, not a failure (docs/cpu_job.md).
EXIT_PREEMPTED = 75
PREEMPTED_FILE = "preempted.json"  # rank 0 writes it when a run stops on a signal
LOCK_FILE = ".lock"


class Preempted(Exception):
    """The run stopped on a signal after writing a complete checkpoint (the CLI prints one line
    and exits ``EXIT_PREEMPTED``)."""

    def __init__(self, iteration: int, out: str):
        super().__init__(
            f"stopped on a signal after iteration {iteration}; checkpoint "
            f"{checkpoint.iter_dir(checkpoint.root_of(out), iteration)} is complete: run the same "
            f"command with --resume to continue (exit status {EXIT_PREEMPTED}: requeue)")
        self.iteration = iteration


class OutDirLock:
    """An advisory lock (``fcntl.flock``) on ``OUT/.lock`` held for the whole run, so two runs
    never write one output directory: the second is refused in one line naming the holder. The
    kernel drops the lock when the holding process ends, however it ends."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutDirLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"--out {os.path.dirname(self.path)} is in use by another run (pid {holder} holds "
                f"{self.path}): wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None


def _preempted_at(out: str) -> Optional[int]:
    try:
        with open(os.path.join(out, PREEMPTED_FILE), encoding="utf-8") as f:
            return int(json.load(f)["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clear_preempted(out: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, PREEMPTED_FILE))


def _drop_terminating_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Terminating process")


def _reported_error(store, world: int) -> Optional[str]:
    """The lowest rank's input-error message from the rendezvous store, or None."""
    for rank in range(world):
        key = f"{ERROR_KEY}{rank}"
        if store.check([key]):
            return store.get(key).decode("utf-8", errors="replace")
    return None


def _notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _make_out_dir(out: str) -> bool:
    """Create ``out`` (True if this call created it: ``os.mkdir`` succeeds for one of several
    runs started together); one-line ValueError if it cannot be used."""
    created = False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        try:
            os.mkdir(out)
            created = True
        except FileExistsError:
            if not os.path.isdir(out):
                raise NotADirectoryError(20, "Not a directory", out) from None
    except OSError as exc:
        raise ValueError(
            f"cpu.out_dir/--out {out!r}: cannot create the output directory "
            f"({exc.strerror or type(exc).__name__}): choose a writable directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(
            f"cpu.out_dir/--out {out!r} is not writable: choose a writable directory or fix its "
            "permissions")
    return created


def _remove_created(out: str, created_out: bool, created_data: bool) -> None:
    """After a failed run (holding the directory's lock): remove what it created, unless it
    completed a checkpoint."""
    if checkpoint.scan(checkpoint.root_of(out))[0]:
        return
    if created_out:
        shutil.rmtree(out, ignore_errors=True)
    elif created_data:
        shutil.rmtree(os.path.join(out, "data"), ignore_errors=True)


def _quiet_megatron_fallbacks() -> None:
    """Silence the Megatron notices that do not apply to the CPU runner (``CPU_PATH_LINE`` says
    once what it does instead); call before megatron is imported. Each filter matches one
    message; every other warning still shows.

    * "Transformer Engine and Apex are not installed ..." / "Apex is not installed. Falling back
      to Torch Norm": import-time warnings of megatron.core's optimizer, clip_grads,
      megatron_fsdp and layer specs; the runner uses torch.optim.AdamW, its own gradient clipping
      and Megatron's local (torch) norms by design.
    * "full scope is deprecated ...": TransformerConfig's own default ``cuda_graph_scope="full"``
      (0.16) warns about itself; the runner uses no CUDA graphs.
    * "No CUDA runtime is found ...": torch's CUDA build, logged when megatron.core imports
      ``torch.utils.cpp_extension``.
    * "GPTModel IS DEPRECATED ..." (0.19): the CPU runner builds Megatron's GPTModel on purpose,
      the model every supported megatron-core has; the cluster path is Megatron-LM's choice.
    * "Unknown MLP type ...": ``TransformerLayer`` passes ``pg_collection`` only to MLP classes it
      lists by identity; our MoE layer is a subclass of ``MoELayer``, so it gets the default
      process groups from parallel_state, which is what the runner initialises."""
    for message in ("Transformer Engine and Apex are not installed",
                    "Apex is not installed. Falling back to Torch Norm",
                    "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)

    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: not str(record.msg).startswith("Unknown MLP type"))
    # torch's CUDA builds (the only torch for Python 3.12 on the registry) log "No CUDA runtime is
    # found" when megatron.core (0.19) imports torch.utils.cpp_extension; the runner needs none.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(
        lambda record: not str(record.msg).startswith("GPTModel IS DEPRECATED"))


_STOP_SIGNAL: List[int] = []  # in a worker: the stop signals received (see STOP_SIGNALS)


def _request_stop(signum, _frame) -> None:
    _STOP_SIGNAL.append(signum)


def _worker(rank: int, cfg: CPUTrainConfig, port: int, resume_from, exit_after: Optional[int]):
    for signum in STOP_SIGNALS:  # acted on between steps (Trainer.train), never mid-step
        signal.signal(signum, _request_stop)
    _quiet_megatron_fallbacks()
    torch.set_num_threads(cfg.threads)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=cfg.ep_size)
    try:
        Trainer(cfg, rank).train(resume_from=resume_from, exit_after=exit_after)
    except USER_ERRORS as exc:
        store.set(f"{ERROR_KEY}{rank}", one_line(exc))
        store.add(f"{ERROR_KEY}count", 1)  # a round trip: the message is stored when it returns
        sys.stdout.flush()
        sys.stderr.flush()
        # No destroy_process_group: the other rank may wait in a collective for this one; the
        # launching process stops it.
        os._exit(EXIT_INPUT_ERROR)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: CPUTrainConfig, rank: int):
        from megatron.core import parallel_state as ps

        from megatron_c2r.cpu.data import build_corpus, build_datasets
        from megatron_c2r.cpu.model import build_model, expert_parameter
        from megatron_c2r.cpu.platform import setup_cpu_megatron
        from megatron_c2r.metrics.report import C2RMetrics

        self.cfg, self.rank, self.world = cfg, rank, cfg.ep_size
        if dist.get_world_size() != cfg.ep_size:
            raise ValueError(
                f"the CPU runner needs world size = expert-model-parallel-size ({cfg.ep_size}); "
                f"got {dist.get_world_size()} processes"
            )
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        # The world is gloo already: Megatron's extra gloo copies of the DP groups would only add
        # idle threads (each gloo group keeps its own), and nothing here uses them.
        ps.initialize_model_parallel(
            expert_model_parallel_size=cfg.ep_size, create_gloo_process_groups=False
        )
        setup_cpu_megatron(cfg.seed)
        # The model first: its router and dispatcher validate their settings, so a bad value
        # fails before the data cache is written (build_model seeds torch itself; the dataset
        # builder draws from numpy only, so the order changes no number).
        self.model = build_model(cfg, cfg.seed)
        data_dir = os.path.join(cfg.out_dir, "data")
        if rank == 0:  # rank 0 writes the corpus and the dataset index caches first
            corpus = build_corpus(data_dir, cfg.corpus_bytes, corpus=cfg.corpus)
            if corpus.note:
                _notice(corpus.note)
            self.train_ds, self.valid_ds = self._datasets(build_datasets, corpus, data_dir)
        dist.barrier()
        if rank != 0:
            corpus = build_corpus(data_dir, cfg.corpus_bytes, corpus=cfg.corpus)
            self.train_ds, self.valid_ds = self._datasets(build_datasets, corpus, data_dir)
        self.corpus = corpus
        self.optimizer = self._optimizer()
        # Fixed for the run (relabelling moves data, not Parameter objects).
        params = [(n, p) for n, p in self.model.named_parameters()]
        self._dense_params = [p for n, p in params if not expert_parameter(n)]
        self._expert_params = [p for n, p in params if expert_parameter(n)]
        self.metrics = C2RMetrics().attach(self.model)
        self.iteration = 0
        self.placements: List[Dict] = []  # per re-plan: iteration, orders, predicted ranks/token
        self.history: List[Dict[str, float]] = []  # rank 0: one row per step (history.csv)
        self.segments: List[Dict] = []  # earlier runs of this job: start, end iteration, seconds
        self._segment_start = 0
        self._saved_at: Optional[int] = None  # iteration of the last checkpoint written or loaded
        self.last_metrics: Dict[str, float] = {}  # the latest C2RMetrics report (summary line)

    def _datasets(self, build_datasets, corpus, data_dir):
        cfg = self.cfg
        return build_datasets(
            corpus,
            seq_length=cfg.seq_length,
            train_samples=cfg.train_iters * cfg.micro_batch_size * self.world,
            valid_samples=max(cfg.eval_iters, 1) * cfg.micro_batch_size * self.world,
            seed=cfg.seed,
            cache_dir=os.path.join(data_dir, "cache"),
        )

    def _optimizer(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "router" not in name else no_decay).append(p)
        cfg = self.cfg
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        )

    # -- schedule ------------------------------------------------------------------------------
    def lr_at(self, it: int) -> float:
        cfg = self.cfg
        if it < cfg.lr_warmup_iters:
            return cfg.lr * (it + 1) / cfg.lr_warmup_iters
        if cfg.lr_decay_style == "constant":
            return cfg.lr
        frac = (it - cfg.lr_warmup_iters) / max(1, cfg.train_iters - cfg.lr_warmup_iters)
        frac = min(max(frac, 0.0), 1.0)
        if cfg.lr_decay_style == "linear":
            return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - frac)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))

    # -- data ----------------------------------------------------------------------------------
    def _batch(self, dataset, index: int):
        """Samples [index*mb*world + rank*mb, +mb): a function of (step, rank) only."""
        mb = self.cfg.micro_batch_size
        start = (index * self.world + self.rank) * mb
        samples = [dataset[(start + i) % len(dataset)] for i in range(mb)]
        return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    def _loss(self, batch) -> torch.Tensor:
        losses = self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        mask = batch["loss_mask"]
        return (losses * mask).sum() / mask.sum()

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, it: int, batch=None) -> float:
        """One optimizer step on ``batch`` (default: the step's own batch); returns this rank's
        loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch if batch is not None else self._batch(self.train_ds, it))
        loss.backward()
        self._reduce_gradients()
        self._clip_gradients()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(it)
        self.optimizer.step()
        self._update_expert_bias()
        return float(loss.detach())

    @torch.no_grad()
    def _update_expert_bias(self) -> None:
        """Aux-loss-free balancing (what Megatron's finalize_model_grads does): move each
        expert's bias towards the mean load, from the token counts summed over ranks."""
        if not self.cfg.router_enable_expert_bias:
            return
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        for module in self.model.modules():
            if getattr(module, "expert_bias", None) is not None and hasattr(module, "local_tokens_per_expert"):
                module.expert_bias.copy_(get_updated_expert_bias(
                    module.local_tokens_per_expert, module.expert_bias, self.cfg.router_bias_update_rate))
                module.local_tokens_per_expert.zero_()

    def _reduce_gradients(self) -> None:
        """Dense parameters are replicated (data parallel over all ranks): average their grads.
        Expert gradients already hold every rank's tokens (through the all-to-all backward), so
        they are divided by the data-parallel size only, as Megatron's DDP does."""
        dense = [p.grad for p in self._dense_params if p.grad is not None]
        if dense:
            flat = torch.cat([g.flatten() for g in dense])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in dense:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for p in self._expert_params:
            if p.grad is not None:
                p.grad /= self.world

    def _clip_gradients(self) -> None:
        """Global-norm clipping: dense norms are identical on all ranks, expert norms are summed."""
        def sq_norm(params):
            grads = [p.grad.double().pow(2).sum() for p in params if p.grad is not None]
            return torch.stack(grads).sum() if grads else torch.zeros((), dtype=torch.float64)

        dense_sq, expert_sq = sq_norm(self._dense_params), sq_norm(self._expert_params)
        dist.all_reduce(expert_sq)
        norm = float((dense_sq + expert_sq).sqrt())
        self.last_grad_norm = norm
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    # -- placement at the end of the warm-up (and of each refresh window) ----------------------
    def plan_and_relabel(self) -> Dict:
        """Sum every router's tracker over ranks, plan a balanced placement per layer, and
        relabel experts in place (weights and optimizer state move between ranks)."""
        from megatron_c2r.cpu.replanning import plan_and_relabel_model

        return plan_and_relabel_model(self.model, self.optimizer, seed=self.cfg.seed,
                                      plan_nodes=self.cfg.replan_nodes)

    def _replan_due(self, it: int, warmup: int) -> bool:
        """When the warm-up ends, and when a refresh window ends (c2r.refresh_interval)."""
        from megatron_c2r.moe.router import c2r_routers

        if warmup > 0 and it + 1 == warmup:
            return True
        if it + 1 == self.cfg.train_iters:  # nothing left to train on the new placement
            return False
        return any(router.refresh_due(it) for router in c2r_routers(self.model))

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(self.cfg.eval_iters):
            loss = self._loss(self._batch(self.valid_ds, i))
            total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total[0] / total[1])

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, segment_s: float) -> None:
        """Collective: ``checkpoint.save`` with rank 0's history and run clock (the segments so
        far plus this one, ``segment_s`` seconds of training since it started)."""
        clock = self.segments + [self._segment(segment_s)]
        checkpoint.save(self, extra_rank0={"history": self.history, "segments": clock,
                                           "last_metrics": self.last_metrics})
        self._saved_at = self.iteration

    def load_checkpoint(self, ckpt: "checkpoint.Checkpoint") -> None:
        state = checkpoint.load_rank_state(ckpt, self.rank)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.placements = state["placements"]
        self.history = list(state.get("history", []))
        self.segments = list(state.get("segments", []))
        self.last_metrics = dict(state.get("last_metrics", {}))
        self._saved_at = self.iteration

    def _stop_on_signal(self, elapsed_s: float, bar) -> None:
        """Checkpoint this iteration on every rank (unless just saved), then rank 0 records
        where it stopped (``PREEMPTED_FILE``, read by the launcher) after the checkpoint is
        complete. No evaluation or final outputs: the resumed run writes them."""
        if self._saved_at != self.iteration:
            self.save_checkpoint(elapsed_s)
        if self.rank == 0:
            if bar is not None:
                bar.close()
            checkpoint.write_json({"iteration": self.iteration},
                                  os.path.join(self.cfg.out_dir, PREEMPTED_FILE))
        dist.barrier()

    def _segment(self, elapsed_s: float) -> Dict:
        return {"start": self._segment_start, "end": self.iteration, "elapsed_s": elapsed_s}

    # -- loop ----------------------------------------------------------------------------------
    def train(self, *, resume_from: Optional["checkpoint.Checkpoint"] = None,
              exit_after: Optional[int] = None) -> None:
        """Train to ``cfg.train_iters`` (or ``exit_after``), evaluate, checkpoint, and on rank 0
        write the outputs. ``resume_from``: a checkpoint chosen by ``checkpoint.prepare``."""
        from megatron_c2r.moe.router import step_routers

        cfg = self.cfg
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._segment_start = self.iteration
        csv_path = os.path.join(cfg.out_dir, "metrics.csv") if self.rank == 0 else None
        if csv_path:  # rows past the resumed iteration (or of an earlier run) would repeat
            outputs.trim_metrics_csv(csv_path, self.iteration)
        writer = outputs.tensorboard_writer(cfg.out_dir) if self.rank == 0 else None
        bar = outputs.progress_bar(cfg, self.iteration) if self.rank == 0 else None
        warmup = cfg.c2r.router.warmup_steps if cfg.c2r.enabled else 0
        t_start, tokens_done = time.perf_counter(), 0
        stop = cfg.train_iters if exit_after is None else min(cfg.train_iters, exit_after)
        while self.iteration < stop:
            it = self.iteration
            t0 = time.perf_counter()
            loss = self.train_step(it)
            if cfg.c2r.enabled and cfg.replan and self._replan_due(it, warmup):
                self.placements.append({"iteration": it + 1, **self.plan_and_relabel()})
            step_routers(self.model, it)
            self.metrics.record(self.model)
            # One all-reduce for the mean loss and "has any rank been asked to stop": the ranks
            # agree on the step to stop after, whichever got the signal first.
            loss_t = torch.tensor([loss, float(bool(_STOP_SIGNAL))])
            dist.all_reduce(loss_t)
            loss, stop_requested = float(loss_t[0]) / self.world, bool(loss_t[1] > 0)
            tokens_done += cfg.tokens_per_step
            self.iteration += 1
            row = {"iteration": self.iteration, "loss": loss, "lr": self.lr_at(it),
                   "grad_norm": self.last_grad_norm,
                   "step_time_s": time.perf_counter() - t0,
                   "constrained": int(cfg.c2r.enabled and self.iteration > warmup)}
            if self.iteration % cfg.log_interval == 0 or self.iteration in (1, stop):
                values = self.metrics.report(self.iteration, tb_writer=writer, csv_path=csv_path,
                                             group=dist.group.WORLD, per_layer=True)
                self.metrics.reset()
                self.last_metrics = values
                row["ranks_per_token"] = values.get("moe/c2r/ranks_per_token", float("nan"))
                row["rows_per_token_alltoall"] = values.get("moe/c2r/rows_per_token_alltoall", float("nan"))
                for name in outputs.BALANCE:  # busiest rank/node load over the mean (plot)
                    row[name] = values.get(f"moe/c2r/{name}", float("nan"))
            if self.rank == 0:
                self.history.append(row)
                if writer is not None:
                    writer.add_scalar("lm loss", loss, self.iteration)
                    writer.add_scalar("learning-rate", row["lr"], self.iteration)
                    writer.add_scalar("grad-norm", row["grad_norm"], self.iteration)
                tps = tokens_done / (time.perf_counter() - t_start)
                outputs.update_bar(bar, loss, self.last_metrics, tps)
            if cfg.save_interval and self.iteration % cfg.save_interval == 0:
                self.save_checkpoint(time.perf_counter() - t_start)
            if stop_requested and self.iteration < stop:
                self._stop_on_signal(time.perf_counter() - t_start, bar)
                return
        elapsed = time.perf_counter() - t_start
        val_loss = self.evaluate()
        if self._saved_at != self.iteration:  # else the step's own checkpoint is the last one
            self.save_checkpoint(elapsed)
        if self.rank == 0:
            if bar is not None:
                bar.close()
            outputs.finish(self, val_loss=val_loss,
                           segments=self.segments + [self._segment(elapsed)],
                           last_metrics=self.last_metrics, writer=writer, config=as_dict(cfg))
        dist.barrier()
