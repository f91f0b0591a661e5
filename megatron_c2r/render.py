"""What a run config executes, as text: ``megatron-c2r render CONFIG.yaml [--set k=v] [--format FMT]``.

``render(cfg, fmt)`` is deterministic (same file + overrides -> same bytes; golden-tested): the
command ONE training process runs and the environment it needs. Launchers (srun, torchrun, the
SLURM scripts) wrap that command; they never rebuild it. Formats:

    shell   (default) ``export K=V`` lines, then the command, one flag per line; paste-runnable
    json    {"command": [...], "env": {...}, "world_size": N, "launch": {...}}
    args    the command, one argv element per line
    args0   the command, each argv element followed by NUL (safe for any characters)
    env     the environment, ``KEY=VALUE`` lines, values shell-quoted
    launch  launch/SLURM knobs as ``KEY=VALUE`` lines, values shell-quoted: NNODES GPUS_PER_NODE
            WORLD_SIZE PARTITION ACCOUNT QOS TIME_LIMIT JOB_NAME CONTAINER_IMAGE CONTAINER_MOUNTS
            (comma-joined, pyxis syntax) EXCLUSIVE (1/0); unset ones are empty
    bash    all of it in one call, as bash assignments a launch script ``eval``s (one Python
            start-up on a batch host instead of three):
                CFG_NNODES=8 ...      every ``launch`` key, prefixed CFG_ so the config's
                                      WORLD_SIZE never clobbers torch's WORLD_SIZE
                C2R_ENV=(CUDA_DEVICE_MAX_CONNECTIONS=1 MEGATRON_LM_PATH=/opt/Megatron-LM ...)
                C2R_CMD=(python -m megatron_c2r.megatron_lm --num-layers 32 ...)

In a script::

    eval "$(megatron-c2r render "$CONFIG" --format launch)"            # NNODES, PARTITION, ...
    mapfile -d '' -t CMD < <(megatron-c2r render "$CONFIG" --format args0)
    set -a; eval "$(megatron-c2r render "$CONFIG" --format env)"; set +a
    srun ... "${CMD[@]}"        # or: torchrun ... -m megatron_c2r.megatron_lm "${CMD[@]:3}"
    eval "$(python -m megatron_c2r render "$CONFIG" --format bash)"    # what launch/lib.sh does

``env``, ``launch`` and ``bash`` values are shell-quoted only when they need quoting, so
``eval``/``source`` read them back exactly. The command always starts with ``<python> -m
megatron_c2r.megatron_lm``. The command line exits with status 2 and one line on stderr for a bad
config; any other failure (no PyYAML on a batch host) exits 1, which the SLURM scripts take as
"render inside the container instead". Imports no torch.
"""

from __future__ import annotations

import json
import shlex

FORMATS = ("shell", "json", "args", "args0", "env", "launch", "bash")
BASH_PREFIX = "CFG_"  # launch keys in the bash format


def render(cfg, fmt: str) -> str:
    """The text ``render`` prints for a validated RunConfig, in one of ``FORMATS``. Raises
    ValueError (one line) for a command the format cannot carry (a newline in ``args``/``bash``)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
    command, env = cfg.program_argv(), cfg.environment()
    if fmt == "args0":
        return "".join(f"{a}\0" for a in command)
    if fmt == "args":
        bad = [a for a in command if "\n" in a]
        if bad:
            raise ValueError(f"argument {bad[0]!r} contains a newline: use --format args0")
        return "".join(f"{a}\n" for a in command)
    if fmt == "env":
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
    if fmt == "launch":
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in launch_vars(cfg).items())
    if fmt == "bash":
        return bash_assignments(cfg)
    if fmt == "json":
        doc = {
            "command": command,
            "env": env,
            "world_size": cfg.launch.world_size,
            "launch": launch_vars(cfg),
        }
        return json.dumps(doc, indent=2) + "\n"
    return _shell(cfg, command, env)


def launch_vars(cfg) -> dict:
    """Launch and SLURM knobs as strings (empty when unset), in a fixed order."""
    launch, slurm = cfg.launch, cfg.slurm
    return {
        "NNODES": str(launch.nodes),
        "GPUS_PER_NODE": str(launch.gpus_per_node),
        "WORLD_SIZE": str(launch.world_size),
        "PARTITION": slurm.partition or "",
        "ACCOUNT": slurm.account or "",
        "QOS": slurm.qos or "",
        "TIME_LIMIT": slurm.time or "",
        "JOB_NAME": slurm.job_name,
        "CONTAINER_IMAGE": slurm.container_image or "",
        "CONTAINER_MOUNTS": ",".join(slurm.container_mounts),
        "EXCLUSIVE": "1" if slurm.exclusive else "0",
    }


def bash_assignments(cfg) -> str:
    """``CFG_<KEY>=value`` lines, then the ``C2R_ENV`` and ``C2R_CMD`` bash arrays."""
    command = cfg.program_argv()
    bad = [a for a in command if "\n" in a]
    if bad:  # bash would read it back fine, but a multi-line flag is never what a user meant
        raise ValueError(f"{cfg.source}: argument {bad[0]!r} contains a newline")
    lines = [f"{BASH_PREFIX}{k}={shlex.quote(v)}" for k, v in launch_vars(cfg).items()]
    env = [f"{k}={v}" for k, v in cfg.environment().items()]
    lines.append("C2R_ENV=(" + " ".join(shlex.quote(e) for e in env) + ")")
    lines.append("C2R_CMD=(" + " ".join(shlex.quote(a) for a in command) + ")")
    return "\n".join(lines) + "\n"


def _shell(cfg, command, env) -> str:
    lines = [
        f"# {cfg.source}: one process of {cfg.launch.world_size} "
        f"({cfg.launch.nodes} nodes x {cfg.launch.gpus_per_node})",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    # Group each flag with its values: "--flag v1 v2".
    groups, current = [], command[:3]
    for arg in command[3:]:
        if arg.startswith("--"):
            groups.append(current)
            current = [arg]
        else:
            current.append(arg)
    groups.append(current)
    body = " \\\n    ".join(" ".join(shlex.quote(a) for a in g) for g in groups)
    return "\n".join(lines) + "\n" + body + "\n"
