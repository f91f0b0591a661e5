"""``CPUTrainConfig``: the CPU main job's settings, read from a run YAML (``configs/tiny_cpu.yaml``).

The same YAML schema as the cluster path (``megatron_c2r.run_config``): Megatron flags under
``megatron:`` describe the model and the optimisation, ``c2r:`` the router and dispatcher, and a
``cpu:`` section the runner's own knobs. The CPU runner honours the subset of Megatron flags
below; any other Megatron flag in a config it runs is an error (it would be silently ignored
otherwise). Its world is one gloo process per EP rank, so parallel sizes are checked against
that, not against the ``launch:`` section (which the CPU job ignores). Loading and validating
import no torch: every error is one line before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_c2r import parallel
from megatron_c2r.errors import ConfigError
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.run_config import RunConfig, load_config
from megatron_c2r.yaml_files import checked, load_raw

# Megatron flag -> (CPUTrainConfig field, type)
MEGATRON_FLAGS = {
    "num-layers": ("num_layers", int),
    "hidden-size": ("hidden_size", int),
    "num-attention-heads": ("num_attention_heads", int),
    "ffn-hidden-size": ("ffn_hidden_size", int),
    "num-experts": ("num_experts", int),
    "moe-router-topk": ("topk", int),
    "moe-ffn-hidden-size": ("moe_ffn_hidden_size", int),
    "expert-model-parallel-size": ("ep_size", int),
    "seq-length": ("seq_length", int),
    "max-position-embeddings": ("max_position_embeddings", int),
    "micro-batch-size": ("micro_batch_size", int),
    "train-iters": ("train_iters", int),
    "lr": ("lr", float),
    "min-lr": ("min_lr", float),
    "lr-warmup-iters": ("lr_warmup_iters", int),
    "lr-decay-style": ("lr_decay_style", str),
    "weight-decay": ("weight_decay", float),
    "adam-beta1": ("adam_beta1", float),
    "adam-beta2": ("adam_beta2", float),
    "clip-grad": ("clip_grad", float),
    "moe-aux-loss-coeff": ("aux_loss_coeff", float),
    "moe-router-load-balancing-type": ("load_balancing_type", str),
    "moe-router-score-function": ("score_function", str),
    "moe-router-num-groups": ("router_num_groups", int),
    "moe-router-group-topk": ("router_group_topk", int),
    "moe-router-pre-softmax": ("router_pre_softmax", bool),
    "moe-router-topk-scaling-factor": ("router_topk_scaling_factor", float),
    "moe-router-enable-expert-bias": ("router_enable_expert_bias", bool),
    "moe-router-bias-update-rate": ("router_bias_update_rate", float),
    "moe-z-loss-coeff": ("z_loss_coeff", float),
    "init-method-std": ("init_method_std", float),
    "seed": ("seed", int),
    "eval-iters": ("eval_iters", int),
    "log-interval": ("log_interval", int),
    "save-interval": ("save_interval", int),
    "normalization": ("normalization", str),
    "swiglu": ("swiglu", bool),
    "untie-embeddings-and-output-weights": ("untie_embeddings", bool),
    "moe-grouped-gemm": ("grouped_gemm", bool),
}
CPU_KEYS = ("out_dir", "corpus", "corpus_bytes", "replan", "replan_nodes", "plot", "threads", "progress")


@dataclass(frozen=True, kw_only=True)
class CPUTrainConfig:
    """Defaults: the tiny model of ``configs/tiny_cpu.yaml`` (comments there say why)."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    num_experts: int = 16
    topk: int = 4
    moe_ffn_hidden_size: int = 128
    ep_size: int = 2  # = gloo processes
    seq_length: int = 128
    # Learned position embeddings for this many positions (None: seq_length); >= seq_length.
    max_position_embeddings: Optional[int] = None
    micro_batch_size: int = 8  # per rank
    train_iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 20
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    aux_loss_coeff: float = 1e-2
    load_balancing_type: str = "aux_loss"
    score_function: str = "softmax"
    router_num_groups: Optional[int] = None  # Megatron's group-limited routing (a baseline)
    router_group_topk: Optional[int] = None
    router_pre_softmax: bool = False
    router_topk_scaling_factor: Optional[float] = None
    router_enable_expert_bias: bool = False
    router_bias_update_rate: float = 1e-3
    z_loss_coeff: Optional[float] = None
    init_method_std: float = 0.02
    seed: int = 1234
    eval_iters: int = 20
    log_interval: int = 10
    save_interval: int = 0  # 0: save at the end only
    normalization: str = "RMSNorm"
    swiglu: bool = True
    untie_embeddings: bool = False
    grouped_gemm: bool = False
    # cpu: section
    out_dir: str = "runs/tiny_cpu"
    # The reference corpus (identical on Python 3.11-3.13; cpu/data.py) holds 2.46 MB.
    corpus: str = "reference"
    corpus_bytes: int = 2_400_000
    replan: bool = True  # plan a placement when the warm-up ends (and every c2r.refresh_interval)
    # Plan the c2r.num_nodes nodes first, then the groups inside each (as `plan --nodes`).
    replan_nodes: bool = False
    plot: bool = True
    threads: int = 1  # torch threads per rank
    progress: bool = True
    c2r: C2ROptions = field(default_factory=C2ROptions)
    source: str = "<defaults>"

    def __post_init__(self):
        try:
            self._check()
        except ValueError as exc:
            raise CPUConfigError(self.source, str(exc)) from None

    def _check(self) -> None:
        """Raise ValueError (one line, YAML names, no file prefix) for a job that cannot run."""
        for name in ("train_iters", "micro_batch_size", "seq_length", "log_interval", "threads",
                     "corpus_bytes"):  # fmt: skip
            parallel.require_positive(getattr(self, name), yaml_name(name))
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "aux_loss_coeff",
                     "init_method_std", "adam_beta1", "adam_beta2"):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{yaml_name(name)}={value!r} must be a finite number >= 0")
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise ValueError(
                f"megatron.--max-position-embeddings={self.max_position_embeddings} is below "
                f"megatron.--seq-length={self.seq_length}: positions past it have no embedding; "
                f"raise it to at least {self.seq_length} or remove it")
        if self.min_lr > self.lr:
            raise ValueError(f"megatron.--min-lr={self.min_lr} is above megatron.--lr={self.lr}: "
                             "the schedule decays from lr to min-lr; lower min-lr")
        if self.grouped_gemm:
            raise ValueError(
                "megatron.--moe-grouped-gemm=true needs the grouped_gemm CUDA kernels (GroupedMLP) "
                "or Transformer Engine: the CPU runner runs SequentialMLP experts; remove it (the "
                "cluster path keeps it)")
        if self.c2r.enabled and self.c2r.dispatcher == "megatron":
            raise ValueError(
                "c2r.dispatcher=megatron builds Megatron's alltoall dispatcher, which needs CUDA "
                "streams: on CPU use c2r.dispatcher: dedup (tested equal to it, outputs and "
                "gradients), or c2r.enabled: false for the top-k baseline")
        if self.corpus not in ("reference", "stdlib"):
            raise ValueError(f"cpu.corpus={self.corpus!r}: use reference (the same bytes on every "
                             "supported Python) or stdlib (this Python's own files)")
        parallel.require_positive(self.ep_size, "megatron.--expert-model-parallel-size")
        parallel.experts_per_rank(
            self.num_experts, self.ep_size, experts_name="megatron.--num-experts",
            ep_name="--expert-model-parallel-size",
        )  # fmt: skip
        parallel.check_topk(
            self.topk, self.num_experts, topk_name="megatron.--moe-router-topk",
            experts_name="--num-experts",
        )  # fmt: skip
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"megatron.--lr-decay-style={self.lr_decay_style!r}: the CPU runner supports "
                "cosine, linear, constant"
            )
        router = self.c2r.router
        if self.c2r.enabled and router.warmup_steps >= self.train_iters:
            raise ValueError(
                f"c2r.warmup_steps={router.warmup_steps} must be below megatron.--train-iters="
                f"{self.train_iters}, or training never leaves the warm-up: lower it with --set "
                f"c2r.warmup_steps=N (N < {self.train_iters}) and repeat that with --resume"
            )
        # Nodes the router knows: c2r.num_nodes, or node mode's c2r.gpus_per_node (it fills them).
        has_nodes = router.num_nodes or (router.mode == "node" and router.gpus_per_node)
        if self.replan_nodes and not (self.c2r.enabled and self.replan and has_nodes):
            raise ValueError(
                "cpu.replan_nodes=true plans nodes first when the job re-plans: it needs "
                "c2r.enabled, cpu.replan: true and c2r.num_nodes (or c2r.mode: node with "
                "c2r.gpus_per_node): set them or cpu.replan_nodes: false"
            )
        if self.c2r.enabled and router.mode == "group" and router.refresh_interval and not self.replan:
            raise ValueError(
                f"c2r.refresh_interval={router.refresh_interval} re-plans the group placement, "
                "but cpu.replan=false: set cpu.replan: true or c2r.refresh_interval: 0"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_length * self.ep_size


class CPUConfigError(ConfigError):
    """A CPUTrainConfig that cannot run: ``'<source>: <detail>'``; ``detail`` alone is kept so a
    RunConfig can blame the ``--set`` that caused it instead of the file."""

    def __init__(self, source: str, detail: str):
        super().__init__(f"{source}: {detail}")
        self.detail = detail


def yaml_name(name: str) -> str:
    """A CPUTrainConfig field as the YAML spells it (``train_iters`` -> ``megatron.--train-iters``)."""
    for flag, (field_name, _) in MEGATRON_FLAGS.items():
        if field_name == name:
            return f"megatron.--{flag}"
    return f"cpu.{name}"


# Command-line flags of `megatron-c2r train` that stand for a YAML key: field -> (key, flag).
CLI_KEYS = {
    "train_iters": ("megatron.train-iters", "--steps"),
    "out_dir": ("cpu.out_dir", "--out"),
    "progress": ("cpu.progress", "--no-progress"),
}


def cpu_config_from_run(run: RunConfig) -> CPUTrainConfig:
    """Map a validated RunConfig onto CPUTrainConfig (errors name the YAML path, or the --set /
    flag that set it)."""
    hints = typing.get_type_hints(CPUTrainConfig)
    values: Dict[str, Any] = {}
    for flag, value in run.megatron.items():
        if flag not in MEGATRON_FLAGS:
            raise run.error(
                f"megatron.--{flag} is not supported by the CPU runner (supported: "
                f"{', '.join(sorted(MEGATRON_FLAGS))}); remove it or use `megatron-c2r pretrain` "
                "on a GPU cluster"
            )
        name, kind = MEGATRON_FLAGS[flag]
        values[name] = _typed(run, f"megatron.--{flag}", value, kind)
    for key, value in run.cpu.items():
        if key not in CPU_KEYS:
            raise run.error(f"cpu.{key} is unknown; expected one of {', '.join(CPU_KEYS)}")
        values[key] = _typed(run, f"cpu.{key}", value, hints[key])
    try:
        return CPUTrainConfig(c2r=run.c2r, source=run.source, **values)
    except CPUConfigError as exc:
        raise run.error(exc.detail) from None


def _typed(run: RunConfig, path: str, value: Any, hint: Any) -> Any:
    try:
        return checked(path, value, hint)
    except ConfigError as exc:
        raise run.error(str(exc)) from None


def load_cpu_config(path: str, sets: Optional[Sequence[str]] = None, **flags: Any) -> CPUTrainConfig:
    """The CPU job of ``path`` + ``--set`` overrides + command-line ``flags`` (``train_iters``,
    ``out_dir``, ``progress``; None = not given), validated, exactly as written (no warm-up
    scaling: that is ``load_train_job``'s). Raises ConfigError."""
    return cpu_config_from_run(load_config(path, sets, values=_flag_values(**flags), world="cpu"))


def load_train_job(
    path: str,
    sets: Optional[Sequence[str]] = None,
    *,
    train_iters: Optional[int] = None,
    out_dir: Optional[str] = None,
    progress: Optional[bool] = None,
) -> Tuple[CPUTrainConfig, List[str]]:
    """``(config, notes)`` for ``megatron-c2r train``: like ``load_cpu_config``, plus a warm-up
    scaled to a short ``--steps`` run (``short_run_warmup``); ``notes`` are the lines to print
    about values chosen for the user."""
    values = _flag_values(train_iters=train_iters, out_dir=out_dir, progress=progress)
    notes = []
    if train_iters is not None:
        tree, origins = load_raw(path, sets)
        scaled = short_run_warmup(tree, [key for key, _ in origins], train_iters)
        if scaled is not None:
            warmup, note = scaled
            values.append(("c2r.warmup_steps", warmup, f"--steps {train_iters}"))
            notes.append(note)
    return cpu_config_from_run(load_config(path, sets, values=values, world="cpu")), notes


def _flag_values(**flags: Any) -> List[Tuple[str, Any, str]]:
    """``load_config`` ``values`` for the given (not None) command-line flags, in CLI_KEYS order."""
    values = []
    for name, (key, flag) in CLI_KEYS.items():
        value = flags.pop(name, None)
        if value is not None:
            values.append((key, value, flag if isinstance(value, bool) else f"{flag} {value}"))
    if flags:
        raise TypeError(f"unknown command-line field(s): {', '.join(flags)}")
    return values


def short_run_warmup(tree: dict, set_keys: Sequence[str], steps: int) -> Optional[Tuple[int, str]]:
    """The warm-up for ``--steps N`` when the config's ``c2r.warmup_steps`` would not end within
    N steps: the same fraction of the run (at least 1 step, at most N - 1), with the line saying
    so. None when the config's warm-up fits, was set with ``--set``, or the config is not one
    this rule can read (validation then reports it).

    Why scale rather than refuse: ``--steps 20`` is how a first run is tried; the rule is a pure
    function of the config and N, so ``--resume`` with the same ``--steps`` gets the same warm-up,
    and a warm-up that fits (the default 300 steps, or ``--steps 80``) is never touched."""
    c2r = tree.get("c2r")
    if not isinstance(c2r, dict) or c2r.get("enabled", True) is not True:
        return None
    if any(key in ("c2r", "c2r.warmup_steps") for key in set_keys):
        return None
    warmup = c2r.get("warmup_steps", 0)
    megatron = tree.get("megatron") if isinstance(tree.get("megatron"), dict) else {}
    total = megatron.get("train-iters", CPUTrainConfig.train_iters)
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, total, steps))
    if not ints or not 0 < warmup < total or warmup < steps or steps < 1:
        return None
    scaled = 0 if steps == 1 else max(1, min(steps - 1, steps * warmup // total))
    note = (
        f"--steps {steps}: c2r.warmup_steps={warmup} would not end within {steps} steps; "
        f"warm-up set to {scaled} (the config's {warmup}/{total} of the run). Pass the same "
        f"--steps with --resume, or choose with --set c2r.warmup_steps=N"
    )
    return scaled, note


def as_dict(cfg: CPUTrainConfig) -> Dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["c2r"] = {"enabled": cfg.c2r.enabled, "dispatcher": cfg.c2r.dispatcher,
                  "router": dataclasses.asdict(cfg.c2r.router)}
    return out


def run_identity(cfg: CPUTrainConfig) -> Dict:
    """What a checkpoint's run is: every resolved setting except those a resume may change
    (``RESUMABLE_CHANGES``), as YAML names -> values. ``--resume`` refuses a different one."""
    flat = {}
    for name, value in as_dict(cfg).items():
        if name in RESUMABLE_CHANGES:
            continue
        if name == "c2r":
            flat["c2r.enabled"] = value["enabled"]
            flat["c2r.dispatcher"] = value["dispatcher"]
            flat.update({f"c2r.{k}": v for k, v in value["router"].items()})
        else:
            flat[yaml_name(name)] = value
    return json.loads(json.dumps(flat, default=str))  # as meta.json holds it


# May change on --resume: how long to train and how it is logged, saved and shown.
RESUMABLE_CHANGES = ("train_iters", "log_interval", "save_interval", "eval_iters", "out_dir",
                     "plot", "threads", "progress", "source")
