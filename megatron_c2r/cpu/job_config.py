"""``CPUTrainConfig``: the CPU main job's settings, read from a run YAML (``configs/tiny_cpu.yaml``).

The same YAML schema as the cluster path (``megatron_c2r.config``): Megatron flags under
``megatron:`` describe the model and the optimisation, ``c2r:`` the router and dispatcher, and a
``cpu:`` section the runner's own knobs. The CPU runner honours the subset of Megatron flags
below; any other Megatron flag in a config it runs is an error (it would be silently ignored
otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from megatron_c2r.config import C2ROptions, ConfigError, RunConfig, load_config

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
    "max-position-embeddings": ("seq_length", int),
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
CPU_KEYS = ("out_dir", "corpus_bytes", "replan", "plot", "threads", "progress")


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
    corpus_bytes: int = 4_000_000
    replan: bool = True  # plan a placement when the warm-up ends (and every c2r.refresh_interval)
    plot: bool = True
    threads: int = 1  # torch threads per rank
    progress: bool = True
    c2r: C2ROptions = field(default_factory=C2ROptions)
    source: str = "<defaults>"

    def __post_init__(self):
        where = self.source
        if self.num_experts % self.ep_size:
            raise ConfigError(
                f"{where}: megatron.--num-experts={self.num_experts} must be divisible by "
                f"--expert-model-parallel-size={self.ep_size}"
            )
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"{where}: megatron.--lr-decay-style={self.lr_decay_style!r}: the CPU runner "
                "supports cosine, linear, constant"
            )
        for name in ("train_iters", "micro_batch_size", "seq_length", "log_interval", "ep_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be >= 1")
        if self.c2r.enabled and self.c2r.router.warmup_steps >= self.train_iters:
            raise ConfigError(
                f"{where}: c2r.warmup_steps={self.c2r.router.warmup_steps} must be below "
                f"megatron.--train-iters={self.train_iters}, or training never leaves the warm-up"
            )
        router = self.c2r.router
        if self.c2r.enabled and router.mode == "group" and router.refresh_interval and not self.replan:
            raise ConfigError(
                f"{where}: c2r.refresh_interval={router.refresh_interval} re-plans the group "
                "placement, but cpu.replan=false: set cpu.replan: true or c2r.refresh_interval: 0"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_length * self.ep_size


def cpu_config_from_run(run: RunConfig, **overrides: Any) -> CPUTrainConfig:
    """Map a validated RunConfig onto CPUTrainConfig (errors name the YAML path)."""
    values: Dict[str, Any] = {}
    for flag, value in run.megatron.items():
        if flag not in MEGATRON_FLAGS:
            raise ConfigError(
                f"{run.source}: megatron.--{flag} is not supported by the CPU runner "
                f"(supported: {', '.join(sorted(MEGATRON_FLAGS))}); remove it or use "
                "`megatron-c2r pretrain` on a GPU cluster"
            )
        name, kind = MEGATRON_FLAGS[flag]
        try:
            values[name] = kind(value) if kind is not bool else bool(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{run.source}: megatron.--{flag}={value!r} must be {kind.__name__}"
            ) from None
    for key, value in run.cpu.items():
        if key not in CPU_KEYS:
            raise ConfigError(
                f"{run.source}: cpu.{key} is unknown; expected one of {', '.join(CPU_KEYS)}"
            )
        values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CPUTrainConfig(c2r=run.c2r, source=run.source, **values)


def load_cpu_config(path: str, sets=None, **overrides: Any) -> CPUTrainConfig:
    return cpu_config_from_run(load_config(path, sets), **overrides)


def as_dict(cfg: CPUTrainConfig) -> Dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["c2r"] = {"enabled": cfg.c2r.enabled, "dispatcher": cfg.c2r.dispatcher,
                  "router": dataclasses.asdict(cfg.c2r.router)}
    return out


