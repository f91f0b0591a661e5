"""Run configs: one YAML file -> validated dataclasses -> the exact Megatron-LM command line.

YAML schema (every section optional; unknown keys are errors)::

    extends: base.yaml            # or a list; merged first (megatron_c2r.yaml_files)
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
      hierarchy: auto             # auto | flat | two_level (dedup across nodes; C2ROptions)
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

Loading imports no torch or Megatron: errors come in milliseconds, before anything starts, as one
line ``WHERE: YAML.path=value: problem; fix``, where WHERE is the ``--set KEY=VALUE`` (or
command-line flag) that set a value the problem names, else the file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_c2r import parallel
from megatron_c2r.errors import ConfigError
from megatron_c2r.megatron_lm.flags import (
    ENTRY_MODULE,
    ROUTER_FIELDS,
    c2r_argv,
    format_value,
    megatron_lm_problem,
)
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.yaml_files import checked, load_raw, merge, nested

SECTIONS = ("megatron", "c2r", "launch", "slurm", "env", "cpu")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
# YAML paths a message names: megatron.--flag (or a bare --flag, which is a Megatron flag in our
# messages) and <section>.<key>.
_MENTION = re.compile(
    r"(?<![\w.-])(?:megatron\.(?:--)?(?P<flag>[a-z0-9][a-z0-9-]*)"
    r"|(?P<section>c2r|launch|slurm|env|cpu)\.(?P<key>\w+)"
    r"|--(?P<bare>[a-z0-9][a-z0-9-]*))"
)


# --------------------------------------------------------------------------------------------
# Where values came from
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Origins:
    """The file a run config was read from and the overrides applied on top of it, in order:
    ``(dotted key as it lands in the tree, label)``, e.g. ``('c2r.max_groups', '--set
    c2r.max_groups=9')`` or ``('megatron.train-iters', '--steps 20')``."""

    source: str
    overrides: Tuple[Tuple[str, str], ...] = ()

    def blame(self, detail: str, keys: Sequence[str] = ()) -> str:
        """The label of the last override that set ``keys`` or a YAML path ``detail`` names
        (first named first), else the file."""
        named = list(keys)
        for m in _MENTION.finditer(detail):
            flag = m.group("flag") or m.group("bare")
            named.append(f"megatron.{flag}" if flag else f"{m.group('section')}.{m.group('key')}")
        for key in named:
            for set_key, label in reversed(self.overrides):
                if key == set_key or key.startswith(set_key + "."):
                    return label
        return self.source

    def error(self, detail: str, keys: Sequence[str] = ()) -> ConfigError:
        """``ConfigError('<where>: <detail>')`` with ``where`` from :meth:`blame`."""
        return ConfigError(f"{self.blame(detail, keys)}: {detail}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
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
    """One validated run. ``megatron`` maps flag names (no ``--``) to YAML values, in file order.
    ``origins`` says which values overrides set (for error messages; not compared)."""

    source: str
    megatron: Dict[str, Any]
    c2r: C2ROptions
    launch: LaunchConfig
    slurm: SlurmConfig
    env: Dict[str, str]
    cpu: Dict[str, Any]
    origins: Optional[Origins] = dataclasses.field(default=None, compare=False)

    def error(self, detail: str, keys: Sequence[str] = ()) -> ConfigError:
        """A one-line ConfigError about this run, blamed on the override or file (``Origins``)."""
        return (self.origins or Origins(self.source)).error(detail, keys)

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
            argv.extend(format_value(v) for v in values)
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
        """Checks only the cluster path needs (required GPT flags, no --spec, a static placement).
        Raises ConfigError."""
        problem = megatron_lm_problem(self.megatron, self.c2r)
        if problem:
            raise self.error(problem)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def load_config(
    path: str,
    overrides: Optional[Iterable[str]] = None,
    *,
    values: Sequence[Tuple[str, Any, str]] = (),
    world: str = "launch",
) -> RunConfig:
    """Read ``path`` (+ extends, + ``--set`` overrides, + ``values``), validate every section and
    the cross-section contradictions. ``values`` are command-line flags that stand for a YAML key:
    ``(dotted key, value, label)``, e.g. ``('megatron.train-iters', 20, '--steps 20')``, applied
    after the overrides. ``world``: which processes the parallel sizes must fit (``WORLDS``).
    Raises ConfigError (a ValueError) with a one-line message. Imports no torch."""
    tree, origins = load_raw(path, overrides)
    for key, value, label in values:
        tree = merge(tree, nested(key.split("."), value))
        origins.append((key, label))
    return build_config(tree, source=path, overrides=origins, world=world)


# Which processes a run's parallel sizes are checked against:
#   "launch"  launch.nodes x launch.gpus_per_node (the cluster path: render, pretrain, estimate)
#   "cpu"     the CPU main job: one gloo process per EP rank, so world = EP and no TP/PP/CP or
#             global batch to fit (the CPU job refuses those flags itself, naming them)
WORLDS = ("launch", "cpu")


def build_config(
    tree: dict,
    *,
    source: str = "<config>",
    overrides: Sequence[Tuple[str, str]] = (),
    world: str = "launch",
) -> RunConfig:
    """Validate an already-merged tree (``megatron`` keys without ``--``). ``overrides`` as in
    ``Origins`` (which keys were set by whom); ``world`` as in ``load_config``."""
    if world not in WORLDS:
        raise TypeError(f"world={world!r} must be one of {', '.join(WORLDS)}")
    origins = Origins(source, tuple(overrides))
    for key in tree:
        if key not in SECTIONS:
            raise origins.error(
                f"{key}: unknown section; expected one of {', '.join(SECTIONS)}", keys=(key,)
            )
    try:
        cfg = RunConfig(
            source=source,
            megatron=_megatron_section(tree.get("megatron") or {}),
            c2r=_c2r_section(tree.get("c2r")),
            launch=_dataclass_section(LaunchConfig, "launch", tree.get("launch")),
            slurm=_dataclass_section(SlurmConfig, "slurm", tree.get("slurm")),
            env=_env_section(tree.get("env") or {}),
            cpu=_mapping("cpu", tree.get("cpu") or {}),
            origins=origins,
        )
        _check_launch(cfg.launch, cfg.slurm)
        _check_contradictions(cfg, world)
    except ValueError as exc:  # ConfigError and the option classes' own one-line messages
        raise origins.error(str(exc)) from None
    return cfg


def _mapping(name: str, section: Any) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{name}={section!r} must be a mapping")
    return section


def _megatron_section(section: Any) -> Dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"megatron={section!r} must be a mapping of --flag: value")
    for flag, value in section.items():
        if "_" in flag:
            raise ConfigError(
                f"megatron.--{flag}: Megatron flags use dashes: write --{flag.replace('_', '-')}"
            )
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", flag):
            raise ConfigError(f"megatron.--{flag}: not a flag name like --num-layers")
        scalars = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float, bool)) for v in scalars) or (
            isinstance(value, list) and any(isinstance(v, bool) for v in value)
        ):
            raise ConfigError(
                f"megatron.--{flag}={value!r}: values are scalars, true/false for bare flags, or "
                "lists of scalars"
            )
    return dict(section)


def _c2r_section(section: Any) -> C2ROptions:
    if section is None:
        return C2ROptions(enabled=False)
    _mapping("c2r", section)
    hints = typing.get_type_hints(C2RRouterConfig)
    own_hints = {k: v for k, v in typing.get_type_hints(C2ROptions).items() if k != "router"}
    router_kwargs, own_kwargs = {}, {}
    for key, value in section.items():
        if key in ROUTER_FIELDS:
            router_kwargs[key] = checked(f"c2r.{key}", value, hints[key])
        elif key in own_hints:
            own_kwargs[key] = checked(f"c2r.{key}", value, own_hints[key])
        else:
            known = ", ".join((*ROUTER_FIELDS, *own_hints))
            raise ConfigError(f"c2r.{key}: unknown option; expected one of {known}")
    # Both raise ValueError naming c2r.<field> (the dispatcher list is moe.options.DISPATCHERS).
    return C2ROptions(router=C2RRouterConfig(**router_kwargs), **own_kwargs)


def _dataclass_section(cls, name: str, section: Any):
    if section is None:
        return cls()
    _mapping(name, section)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in section.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown option; expected one of {', '.join(hints)}")
        kwargs[key] = checked(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _env_section(section: Any) -> Dict[str, str]:
    if not isinstance(section, dict):
        raise ConfigError(f"env={section!r} must be a mapping of NAME: value")
    env = {}
    for key, value in section.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ConfigError(f"env.{key}: not a valid environment variable name")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"env.{key}={value!r} must be a scalar")
        env[key] = format_value(value) if isinstance(value, bool) else str(value)
    return env


def _check_launch(launch: LaunchConfig, slurm: SlurmConfig) -> None:
    for name in ("nodes", "gpus_per_node"):
        parallel.require_positive(getattr(launch, name), f"launch.{name}")
    if slurm.time is not None and not _SLURM_TIME.match(slurm.time):
        raise ConfigError(
            f"slurm.time={slurm.time!r} must be a SLURM time like 04:00:00 or 2-00:00:00"
        )


def _int_flag(cfg: RunConfig, flag: str, default: Optional[int]) -> Optional[int]:
    value = cfg.megatron.get(flag, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"megatron.--{flag}={value!r} must be an integer")


def _check_contradictions(cfg: RunConfig, world: str = "launch") -> None:
    """Cross-section checks (MoE presence, experts and top-k, dispatcher, parallel and batch
    arithmetic against ``world``), in that order. Raises ValueError without a file prefix."""
    c2r = cfg.c2r
    num_experts = _int_flag(cfg, "num-experts", None)
    ep = _int_flag(cfg, "expert-model-parallel-size", 1)
    topk = _int_flag(cfg, "moe-router-topk", 2)
    parallel.require_positive(ep, "megatron.--expert-model-parallel-size")
    if num_experts is not None:
        parallel.experts_per_rank(
            num_experts, ep, experts_name="megatron.--num-experts",
            ep_name="--expert-model-parallel-size",
        )  # fmt: skip
        # Before the router's own checks: top-k > E is a top-k problem, not a max_groups one.
        parallel.check_topk(
            topk, num_experts, topk_name="megatron.--moe-router-topk", experts_name="--num-experts"
        )
    if c2r.enabled:
        if num_experts is None:
            raise ConfigError(
                "c2r: C2R options need an MoE model: set megatron.--num-experts or set "
                "c2r.enabled: false"
            )
        dispatcher_type = cfg.megatron.get("moe-token-dispatcher-type", "allgather")
        if c2r.dispatcher == "dedup" and dispatcher_type == "flex":
            raise ConfigError(
                "c2r.dispatcher='dedup' replaces Megatron's dispatcher but "
                "megatron.--moe-token-dispatcher-type='flex': use alltoall, or c2r.dispatcher: megatron"
            )
        if c2r.router.mode != "topk":
            for flag in ("moe-router-num-groups", "moe-router-group-topk"):
                if cfg.megatron.get(flag) is not None:
                    raise ConfigError(
                        f"megatron.--{flag}={cfg.megatron[flag]!r} contradicts "
                        f"c2r.mode={c2r.router.mode!r} (C2R replaces group-limited routing): "
                        f"set --{flag}: null"
                    )
        router = c2r.router.resolve(num_experts=num_experts, topk=topk, ep_size=ep)
        _check_nodes(cfg, router, ep, world)
    _check_parallelism(cfg, ep, world)


def _ep_nodes(cfg: RunConfig, ep: int, world: str) -> Tuple[Optional[int], str]:
    """(EP ranks per node, what says so) for the EP group of consecutive global ranks (expert
    TP 1, which the dedup dispatcher requires). ``None`` ranks per node: the CPU job's one
    machine without ``c2r.gpus_per_node``."""
    if cfg.c2r.gpus_per_node is not None:
        return cfg.c2r.gpus_per_node, f"c2r.gpus_per_node={cfg.c2r.gpus_per_node}"
    if world == "cpu":
        return None, "the CPU job runs on one machine; c2r.gpus_per_node simulates nodes"
    return cfg.launch.gpus_per_node, f"launch.gpus_per_node={cfg.launch.gpus_per_node}"


def _check_nodes(cfg: RunConfig, router: C2RRouterConfig, ep: int, world: str) -> None:
    """The dedup dispatcher's hierarchy and node routing against the nodes the EP group spans:
    ``two_level`` needs more than one node, nodes must split the EP group evenly (else
    auto/two_level fail at build), and node routing's ``num_nodes`` must be that count."""
    c2r = cfg.c2r
    per_node, source = _ep_nodes(cfg, ep, world)
    nodes = 1 if per_node is None or per_node >= ep else ep // per_node
    ep_name = f"megatron.--expert-model-parallel-size={ep}"
    if c2r.dispatcher == "dedup" and c2r.hierarchy != "flat":
        if per_node is not None and per_node < ep and ep % per_node:
            raise ConfigError(
                f"c2r.hierarchy={c2r.hierarchy!r}: {ep_name} does not split into nodes of "
                f"{per_node} ranks ({source}): use an EP size that is a multiple of it, or "
                "c2r.hierarchy: flat"
            )
        if c2r.hierarchy == "two_level" and nodes == 1:
            raise ConfigError(
                f"c2r.hierarchy='two_level' needs an EP group spanning more than one node, but "
                f"{ep_name} fits in one ({source}): use c2r.hierarchy: auto or flat"
            )
    # Node routing over the EP ranks with an explicit c2r.num_nodes: on a cluster it must be the
    # launch's node count; on CPU the layer checks it against one machine unless it is flat.
    explicit = router.mode == "node" and c2r.gpus_per_node is None and router.num_groups == ep
    layer_checks = c2r.dispatcher == "dedup" and c2r.hierarchy != "flat"
    if explicit and (per_node is not None or layer_checks) and router.num_nodes != nodes:
        fix = (
            f"set c2r.num_nodes: {nodes}" if per_node is not None
            else "give c2r.gpus_per_node instead (simulated nodes), or c2r.hierarchy: flat"
        )  # fmt: skip
        raise ConfigError(
            f"c2r.num_nodes={router.num_nodes} but {ep_name} spans {nodes} node(s) ({source}): {fix}"
        )


def _check_parallelism(cfg: RunConfig, ep: int, world: str = "launch") -> None:
    """The layout rules of ``megatron_c2r.parallel`` on this run's sizes (YAML names). With
    ``world='cpu'`` only the sizes themselves are checked: the CPU job's world is EP by
    construction (so EP always fits it), and any TP/PP/CP flag is the CPU job's error to name."""
    sizes = {}
    for flag in ("tensor-model-parallel-size", "pipeline-model-parallel-size", "context-parallel-size"):
        sizes[flag] = parallel.require_positive(_int_flag(cfg, flag, 1), f"megatron.--{flag}")
    tp, pp, cp = sizes.values()
    etp = _int_flag(cfg, "expert-tensor-parallel-size", tp)
    parallel.require_positive(etp, "megatron.--expert-tensor-parallel-size")
    if world == "cpu":
        return
    world_size = cfg.launch.world_size
    dp = parallel.data_parallel_size(
        world_size, tp, pp, cp, world_name="launch.nodes x launch.gpus_per_node"
    )
    parallel.check_expert_grid(
        world_size, pp, ep, etp, ep_name="megatron.--expert-model-parallel-size"
    )
    micro = _int_flag(cfg, "micro-batch-size", None)
    global_batch = _int_flag(cfg, "global-batch-size", None)
    if micro is not None and global_batch is not None:
        parallel.check_global_batch(
            global_batch, micro, dp, global_name="megatron.--global-batch-size",
            micro_name="micro-batch-size",
        )  # fmt: skip
