"""Run configs: one YAML file -> validated dataclasses -> the exact Megatron-LM command line.

YAML schema (every section optional; unknown keys are errors)::

    extends: base.yaml            # or a list; merged first (see config_files.py)
    megatron:                     # Megatron-LM's own flags, as in its test configs:
      --num-layers: 32            #   --flag: value      -> --flag value
      --use-mcore-models: true    #   true               -> --flag        (bare)
      --no-bias-dropout-fusion: false  # false           -> (omitted)
      --data-path: [1.0, /data/a] #   a list           -> --flag 1.0 /data/a
      --moe-router-num-groups: null    # null deletes a flag inherited from a base
    c2r:                          # our options (absent -> baseline: stock Megatron MoE, our metrics)
      enabled: true               # false -> baseline with the same entry point and metrics
      mode: group                 # topk | c2r | group          (C2RRouterConfig)
      max_groups: 1               # ... every C2RRouterConfig field, same names
      dispatcher: dedup           # dedup (ours: one row per destination rank) | megatron
      metrics_csv: null           # also append moe/c2r/* metrics to this CSV (long format)
    launch:                       # what the SLURM scripts and `pretrain` need to start processes
      nodes: 1
      gpus_per_node: 8            # one process per GPU (on CPU runs: processes per node)
      megatron_lm: /opt/Megatron-LM   # checkout with pretrain_gpt.py (or $MEGATRON_LM_PATH)
      python: python
    slurm: {partition, account, qos, time, job_name, container_image, container_mounts: [..],
            exclusive: true}
    env: {NCCL_DEBUG: WARN, ...}  # exported for every process
    cpu: {...}                    # free-form, owned and validated by the CPU runner

Errors are raised before anything runs and are one line: ``FILE: YAML.path=value: problem; fix``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from megatron_c2r.config_files import ConfigError, load_raw
from megatron_c2r.routing.config import C2RRouterConfig

DISPATCHERS = ("dedup", "megatron")
ENTRY_MODULE = "megatron_c2r.megatron_lm"
SECTIONS = ("megatron", "c2r", "launch", "slurm", "env", "cpu")
# Flags our entry point needs from any Megatron-LM GPT run (Megatron itself asserts later).
REQUIRED_MEGATRON_FLAGS = (
    "num-layers", "hidden-size", "num-attention-heads", "seq-length",
    "max-position-embeddings", "micro-batch-size",
)  # fmt: skip
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class C2ROptions:
    """The ``c2r:`` section: router options plus how the layer is built and observed.

    enabled: False -> the stock router and dispatcher (a baseline run with identical logging).
    router: the C2RRouterConfig every MoE layer shares (field names are the YAML keys).
    dispatcher: 'dedup' -> our MoE layer ships one row per (token, destination rank);
        'megatron' -> Megatron's dispatcher from --moe-token-dispatcher-type.
    (A placement plan is applied to a checkpoint offline, ``megatron-c2r convert --plan``, then
    loaded with ``--load``: Megatron loads weights after the model is built, so relabelling at
    build time would be overwritten.)
    metrics_csv: append per-log-interval metrics here (written by the last rank).
    """

    enabled: bool = True
    router: C2RRouterConfig = field(default_factory=C2RRouterConfig)
    dispatcher: str = "dedup"
    metrics_csv: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """The ``launch:`` section. world size = nodes x gpus_per_node."""

    nodes: int = 1
    gpus_per_node: int = 8
    megatron_lm: Optional[str] = None
    python: str = "python"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """The ``slurm:`` section (read by the launch scripts through ``render --format launch``)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    job_name: str = "megatron-c2r"
    container_image: Optional[str] = None
    container_mounts: Tuple[str, ...] = ()
    exclusive: bool = True


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One validated run. ``megatron`` maps flag names (no ``--``) to YAML values, in file order."""

    source: str
    megatron: Dict[str, Any]
    c2r: C2ROptions
    launch: LaunchConfig
    slurm: SlurmConfig
    env: Dict[str, str]
    cpu: Dict[str, Any]

    def megatron_value(self, flag: str, default: Any = None) -> Any:
        """The value of a Megatron flag as written in YAML (``True`` for bare flags)."""
        return self.megatron.get(flag, default)

    def megatron_argv(self) -> List[str]:
        """Megatron flags in file order: ``--flag value``; true -> bare; false -> omitted."""
        argv: List[str] = []
        for flag, value in self.megatron.items():
            if value is False:
                continue
            argv.append(f"--{flag}")
            if value is True:
                continue
            values = value if isinstance(value, list) else [value]
            argv.extend(_format_value(v) for v in values)
        return argv

    def c2r_argv(self) -> List[str]:
        """Our ``--c2r-*`` flags (parsed by ``megatron_lm.arguments.add_c2r_args``)."""
        return c2r_argv(self.c2r)

    def program_argv(self) -> List[str]:
        """One process's command: ``python -m megatron_c2r.megatron_lm <megatron> <c2r>``."""
        return [self.launch.python, "-m", ENTRY_MODULE, *self.megatron_argv(), *self.c2r_argv()]

    def environment(self) -> Dict[str, str]:
        """Variables to export for every process (config ``env:`` wins over our defaults)."""
        env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # Megatron's TP/SP overlap needs in-order kernels
        if self.launch.megatron_lm:
            env["MEGATRON_LM_PATH"] = self.launch.megatron_lm
        env.update(self.env)
        return env

    def check_megatron_lm(self) -> None:
        """Checks only the cluster path needs: the flags every GPT pretraining run must set."""
        for flag in REQUIRED_MEGATRON_FLAGS:
            if flag not in self.megatron:
                raise ConfigError(f"{self.source}: megatron.--{flag} is required: add it")
        if "train-iters" not in self.megatron and "train-samples" not in self.megatron:
            raise ConfigError(
                f"{self.source}: megatron.--train-iters (or --train-samples) is required: add one"
            )
        if "spec" in self.megatron:
            raise ConfigError(
                f"{self.source}: megatron.--spec={self.megatron['spec']!r}: our entry point builds "
                "the layer spec from the c2r: section; remove --spec"
            )
        if self.c2r.enabled:
            check_static_placement(self.c2r.router, self.source)


def check_static_placement(router: C2RRouterConfig, where: str) -> None:
    """On Megatron-LM the placement is fixed for a job (plans are applied to checkpoints between
    jobs), so group mode cannot re-plan in-run: a refresh interval would count and do nothing."""
    if router.mode == "group" and router.refresh_interval:
        raise ConfigError(
            f"{where}: c2r.refresh_interval={router.refresh_interval} with c2r.mode='group': "
            "Megatron-LM jobs keep one placement (re-plan between jobs with `megatron-c2r plan` + "
            "`megatron-c2r convert`); set c2r.refresh_interval: 0"
        )


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------------------------
# c2r options <-> --c2r-* flags (the single table both directions use)
# --------------------------------------------------------------------------------------------
ROUTER_FIELDS = tuple(f.name for f in dataclasses.fields(C2RRouterConfig))


def _flag_kind(name: str, hint: Any, default: Any) -> Tuple[str, str]:
    """(flag, kind) for one option. kind: int | float | str | int_list | bool_on | bool_off."""
    dashed = name.replace("_", "-")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if hint is bool:
        return (f"--c2r-no-{dashed}", "bool_off") if default else (f"--c2r-{dashed}", "bool_on")
    if origin in (tuple, list):
        return f"--c2r-{dashed}", "int_list"
    return f"--c2r-{dashed}", hint.__name__


def _c2r_flags() -> Dict[str, Tuple[str, str]]:
    table = {}
    for cls in (C2RRouterConfig, C2ROptions):
        hints, instance = typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            if f.name in ("enabled", "router"):
                continue
            table[f.name] = _flag_kind(f.name, hints[f.name], getattr(instance, f.name))
    return table


# YAML key -> (flag, kind), derived from the dataclasses so a new router option gets a flag:
# every C2RRouterConfig field, then dispatcher, metrics_csv. Booleans that default to
# True get a --c2r-no-<name> flag. ``--c2r-disable`` (enabled: false) is added separately.
C2R_FLAGS: Dict[str, Tuple[str, str]] = _c2r_flags()


def c2r_argv(options: C2ROptions) -> List[str]:
    """The ``--c2r-*`` argv for ``options``; every set value is explicit (deterministic)."""
    argv: List[str] = []
    if not options.enabled:
        argv.append("--c2r-disable")
    values = dataclasses.asdict(options.router)
    values.update(dispatcher=options.dispatcher, metrics_csv=options.metrics_csv)
    for key, (flag, kind) in C2R_FLAGS.items():
        value = values[key]
        if kind in ("bool_on", "bool_off"):
            if value == (kind == "bool_on"):
                argv.append(flag)
        elif value is not None:
            text = ",".join(str(v) for v in value) if kind == "int_list" else _format_value(value)
            argv.extend([flag, text])
    return argv


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def load_config(path: str, overrides: Optional[Iterable[str]] = None) -> RunConfig:
    """Read ``path`` (+ extends, + ``--set`` overrides), validate every section and the
    cross-section contradictions. Raises ConfigError (a ValueError) with a one-line message."""
    tree = load_raw(path, overrides)
    return build_config(tree, source=path)


def build_config(tree: dict, *, source: str = "<config>") -> RunConfig:
    """Validate an already-merged tree (``megatron`` keys without ``--``)."""
    where = source
    for key in tree:
        if key not in SECTIONS:
            raise ConfigError(
                f"{where}: {key}: unknown section; expected one of {', '.join(SECTIONS)}"
            )
    megatron = _megatron_section(tree.get("megatron") or {}, where)
    c2r = _c2r_section(tree.get("c2r"), where)
    launch = _dataclass_section(LaunchConfig, "launch", tree.get("launch"), where)
    slurm = _dataclass_section(SlurmConfig, "slurm", tree.get("slurm"), where)
    env = _env_section(tree.get("env") or {}, where)
    cpu = tree.get("cpu") or {}
    if not isinstance(cpu, dict):
        raise ConfigError(f"{where}: cpu={cpu!r} must be a mapping")
    _check_launch(launch, slurm, where)
    cfg = RunConfig(
        source=source, megatron=megatron, c2r=c2r, launch=launch, slurm=slurm, env=env, cpu=cpu
    )
    _check_contradictions(cfg)
    return cfg


def _megatron_section(section: Any, where: str) -> Dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: megatron={section!r} must be a mapping of --flag: value")
    for flag, value in section.items():
        if "_" in flag:
            raise ConfigError(
                f"{where}: megatron.--{flag}: Megatron flags use dashes: write "
                f"--{flag.replace('_', '-')}"
            )
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", flag):
            raise ConfigError(f"{where}: megatron.--{flag}: not a flag name like --num-layers")
        scalars = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float, bool)) for v in scalars) or (
            isinstance(value, list) and any(isinstance(v, bool) for v in value)
        ):
            raise ConfigError(
                f"{where}: megatron.--{flag}={value!r}: values are scalars, true/false for bare "
                "flags, or lists of scalars"
            )
    return dict(section)


def _c2r_section(section: Any, where: str) -> C2ROptions:
    if section is None:
        return C2ROptions(enabled=False)
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: c2r={section!r} must be a mapping")
    hints = typing.get_type_hints(C2RRouterConfig)
    own = {f.name: f for f in dataclasses.fields(C2ROptions) if f.name != "router"}
    own_hints = typing.get_type_hints(C2ROptions)
    router_kwargs, own_kwargs = {}, {}
    for key, value in section.items():
        if key in ROUTER_FIELDS:
            router_kwargs[key] = _checked(f"c2r.{key}", value, hints[key], where)
        elif key in own:
            own_kwargs[key] = _checked(f"c2r.{key}", value, own_hints[key], where)
        else:
            known = ", ".join((*ROUTER_FIELDS, *own))
            raise ConfigError(f"{where}: c2r.{key}: unknown option; expected one of {known}")
    dispatcher = own_kwargs.get("dispatcher", "dedup")
    if dispatcher not in DISPATCHERS:
        raise ConfigError(
            f"{where}: c2r.dispatcher={dispatcher!r} must be one of {', '.join(DISPATCHERS)}"
        )
    try:
        router = C2RRouterConfig(**router_kwargs)
    except ValueError as exc:  # its messages already name c2r.<field>
        raise ConfigError(f"{where}: {exc}") from None
    return C2ROptions(router=router, **own_kwargs)


def _dataclass_section(cls, name: str, section: Any, where: str):
    if section is None:
        return cls()
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: {name}={section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in section.items():
        if key not in hints:
            raise ConfigError(
                f"{where}: {name}.{key}: unknown option; expected one of {', '.join(hints)}"
            )
        kwargs[key] = _checked(f"{name}.{key}", value, hints[key], where)
    return cls(**kwargs)


def _env_section(section: Any, where: str) -> Dict[str, str]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: env={section!r} must be a mapping of NAME: value")
    env = {}
    for key, value in section.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ConfigError(f"{where}: env.{key}: not a valid environment variable name")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{where}: env.{key}={value!r} must be a scalar")
        env[key] = _format_value(value) if isinstance(value, bool) else str(value)
    return env


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _checked(path: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (int, float, str, bool, Optional[X], Tuple[X, ...])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _checked(path, value, hint, where)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path}={value!r} must be a list")
        return tuple(_checked(f"{path}[{i}]", v, args[0], where) for i, v in enumerate(value))
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:  # pragma: no cover (a schema type we do not support)
        raise TypeError(f"unsupported config type {hint!r} for {path}")
    if not ok:
        raise ConfigError(f"{where}: {path}={value!r} must be a {hint.__name__}")
    return float(value) if hint is float else value


def _check_launch(launch: LaunchConfig, slurm: SlurmConfig, where: str) -> None:
    for name in ("nodes", "gpus_per_node"):
        if getattr(launch, name) < 1:
            raise ConfigError(f"{where}: launch.{name}={getattr(launch, name)} must be >= 1")
    if slurm.time is not None and not _SLURM_TIME.match(slurm.time):
        raise ConfigError(
            f"{where}: slurm.time={slurm.time!r} must be a SLURM time like 04:00:00 or 2-00:00:00"
        )


def _int_flag(cfg: RunConfig, flag: str, default: Optional[int]) -> Optional[int]:
    value = cfg.megatron.get(flag, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{cfg.source}: megatron.--{flag}={value!r} must be an integer")


def _check_contradictions(cfg: RunConfig) -> None:
    """Cross-section checks (MoE presence, EP, dispatcher, parallel and batch arithmetic)."""
    where, c2r = cfg.source, cfg.c2r
    num_experts = _int_flag(cfg, "num-experts", None)
    ep = _int_flag(cfg, "expert-model-parallel-size", 1)
    topk = _int_flag(cfg, "moe-router-topk", 2)
    if num_experts is not None and num_experts % ep:
        raise ConfigError(
            f"{where}: megatron.--expert-model-parallel-size={ep} must divide "
            f"--num-experts={num_experts}: pick a divisor of {num_experts}"
        )
    if c2r.enabled:
        if num_experts is None:
            raise ConfigError(
                f"{where}: c2r: C2R options need an MoE model: set megatron.--num-experts "
                "or set c2r.enabled: false"
            )
        dispatcher_type = cfg.megatron.get("moe-token-dispatcher-type", "allgather")
        if c2r.dispatcher == "dedup" and dispatcher_type == "flex":
            raise ConfigError(
                f"{where}: c2r.dispatcher='dedup' replaces Megatron's dispatcher but "
                "megatron.--moe-token-dispatcher-type='flex': use alltoall, or c2r.dispatcher: megatron"
            )
        if c2r.router.mode != "topk":
            for flag in ("moe-router-num-groups", "moe-router-group-topk"):
                if cfg.megatron.get(flag) is not None:
                    raise ConfigError(
                        f"{where}: megatron.--{flag}={cfg.megatron[flag]!r} contradicts "
                        f"c2r.mode={c2r.router.mode!r} (C2R replaces group-limited routing): "
                        f"set --{flag}: null"
                    )
        try:
            c2r.router.resolve(num_experts=num_experts, topk=topk, ep_size=ep)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    _check_parallelism(cfg, ep)


def _check_parallelism(cfg: RunConfig, ep: int) -> None:
    """world = nodes x gpus_per_node; DP = world / (TP x PP x CP); the expert grid
    EP x ETP must divide world / PP; global batch = micro x DP x grad-accum."""
    where, world = cfg.source, cfg.launch.world_size
    tp = _int_flag(cfg, "tensor-model-parallel-size", 1)
    pp = _int_flag(cfg, "pipeline-model-parallel-size", 1)
    cp = _int_flag(cfg, "context-parallel-size", 1)
    etp = _int_flag(cfg, "expert-tensor-parallel-size", tp)
    if world % (tp * pp * cp):
        raise ConfigError(
            f"{where}: launch.nodes x launch.gpus_per_node={world} is not divisible by "
            f"TP x PP x CP={tp}x{pp}x{cp}: change the parallel sizes or the node count"
        )
    if (world // pp) % (ep * etp):
        raise ConfigError(
            f"{where}: megatron.--expert-model-parallel-size={ep} x expert TP={etp} must divide "
            f"world/PP={world // pp}: change EP or the node count"
        )
    dp = world // (tp * pp * cp)
    micro = _int_flag(cfg, "micro-batch-size", None)
    global_batch = _int_flag(cfg, "global-batch-size", None)
    if micro is not None and global_batch is not None and global_batch % (micro * dp):
        raise ConfigError(
            f"{where}: megatron.--global-batch-size={global_batch} must be a multiple of "
            f"micro-batch-size x DP={micro}x{dp}={micro * dp}"
        )
