"""Reading YAML run configs safely and boundedly: ``extends:`` chains, ``--set`` overrides, types.

This module knows nothing about what the sections mean (``megatron_c2r.run_config`` does); it turns
one file plus overrides into one plain nested dict, and converts single values to declared types.

Rules:
    * Every input is bounded before it is parsed, so a hostile file costs milliseconds, not
      gigabytes: at most ``MAX_FILE_BYTES`` (read with ``read_bounded_text``, which other readers
      of user files reuse), no aliases (``*name``; an "alias bomb" of nested anchors expands
      exponentially, and run configs reuse values through ``extends:`` and ``--set`` instead), at
      most ``MAX_YAML_NODES`` values and ``MAX_YAML_DEPTH`` levels of nesting. Files are parsed
      with PyYAML's safe loader (libyaml's when installed): plain data only, never objects.
    * Files must exist, be regular files ending in ``.yaml``/``.yml``; the top level is a mapping.
    * ``extends: base.yaml`` (or a list, applied left to right) names base files relative to the
      extending file. Bases are merged first, then the file itself on top. Cycles, chains
      deeper than ``MAX_EXTENDS_DEPTH`` files, and trees that read more than
      ``MAX_EXTENDS_FILES`` files or ``MAX_EXTENDS_BYTES`` bytes in all (a file listing the same
      base many times, each listing it again, grows exponentially in breadth) are errors.
    * Merging: mappings merge key by key, recursively; any other value (lists included) replaces.
      A ``null`` value deletes the key it lands on, so a C2R variant can drop a flag its baseline
      sets (``--moe-router-num-groups: null``).
    * ``--set a.b=value``: ``value`` is parsed as YAML, with the same bounds (``8`` -> int,
      ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> delete), then merged like one more file.
      Inside ``megatron:`` a key may be written with or without its leading ``--``
      (``--set megatron.num-layers=4``).

Every error is a one-line ``ConfigError`` naming the file or the ``--set``.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import typing
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import yaml

from megatron_c2r.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
MAX_YAML_NODES = 50_000  # a 20k-file --data-path blend fits; parsing 50k values takes ~0.2 s
MAX_YAML_DEPTH = 32
MAX_EXTENDS_DEPTH = 8
MAX_EXTENDS_FILES = 64  # files read for one config, counting repeats
MAX_EXTENDS_BYTES = 4 << 20
YAML_SUFFIXES = (".yaml", ".yml")
# libyaml's parser and constructor when PyYAML was built with it (10x faster), else pure Python.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string; typed float fields accept it.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# --------------------------------------------------------------------------------------------
# Bounded reading (reusable for any user file: YAML, JSON plans, traces)
# --------------------------------------------------------------------------------------------
def read_bounded_text(path: str, max_bytes: int, what: str) -> str:
    """The UTF-8 text of the regular file ``path``, refusing more than ``max_bytes`` bytes.

    Reads at most ``max_bytes + 1`` bytes whatever the file claims (a FIFO, ``/dev/zero`` or a
    file growing under us cannot make it read more). ``what`` names the input in messages
    ("run config", "plan file"). Raises FileNotFoundError (no such file), IsADirectoryError,
    PermissionError, ValueError (not a regular file, too large, not UTF-8); every message is one
    line naming the file.
    """
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not hang (regular files ignore it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}: check the path") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied: cannot read this {what}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{path}: is a directory, expected a {what} file")
        raise ValueError(f"{path}: not a regular file: a {what} is a plain file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(
            f"{path}: larger than {max_bytes} bytes, the limit for a {what}: is this the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}): a {what} is text") from None


def load_yaml_text(text: str, where: str) -> Any:
    """Parse one YAML document with the bounds above. ``where`` prefixes every error (a file
    name or ``--set KEY=VALUE``). Raises ConfigError for aliases, too many values or too deep
    nesting, yaml.YAMLError for syntax errors (callers word those)."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, over the {MAX_FILE_BYTES} limit")
    nodes = depth = 0
    # One pass over the parser's events (cheap: no objects are built) before constructing.
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark is not None else "?"
            raise ConfigError(
                f"{where}: line {line}: YAML aliases (*{event.anchor}) are not accepted: write "
                "the value out, or share it through extends:"
            )
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ConfigError(f"{where}: more than {MAX_YAML_NODES} YAML values: not a run config")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader, see _LOADER)


def read_yaml_file(path: str) -> dict:
    """Parse one YAML file into a dict (no ``extends`` handling). Raises ConfigError."""
    if not path.endswith(YAML_SUFFIXES):
        raise ConfigError(f"{path}: not a YAML file: config files end in .yaml or .yml")
    if not os.path.lexists(path):
        raise ConfigError(f"{path}: no such config file: check the path")
    try:
        text = read_bounded_text(path, MAX_FILE_BYTES, "run config")
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    try:
        data = load_yaml_text(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level is a {type(data).__name__}: a run config is a mapping of sections"
        )
    return data


# --------------------------------------------------------------------------------------------
# extends: chains and --set overrides
# --------------------------------------------------------------------------------------------
def merge(base: dict, top: dict) -> dict:
    """A new dict: ``top`` merged onto ``base`` (mappings recursively; ``None`` deletes)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(_drop_nulls(value))
    return out


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


def load_tree(path: str, _chain: tuple = (), _read: Optional[list] = None) -> dict:
    """The file at ``path`` with its ``extends`` chain merged in (the ``extends`` key removed).
    ``_read``: [files, bytes] read so far for this config (the breadth bound)."""
    _read = [0, 0] if _read is None else _read
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(os.path.basename(p) for p in (*_chain, real))
        raise ConfigError(f"{path}: extends: cycle {cycle}: remove one of the links")
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path}: extends: chain deeper than {MAX_EXTENDS_DEPTH} files")
    _read[0] += 1
    _read[1] += os.path.getsize(real) if os.path.isfile(real) else 0
    if _read[0] > MAX_EXTENDS_FILES or _read[1] > MAX_EXTENDS_BYTES:
        root = os.path.basename(_chain[0]) if _chain else os.path.basename(path)
        raise ConfigError(
            f"{path}: extends: {root} reads more than {MAX_EXTENDS_FILES} files or "
            f"{MAX_EXTENDS_BYTES >> 20} MiB in all (bases listed again and again): list each base "
            "once")
    data = read_yaml_file(path)
    if isinstance(data.get("megatron"), dict):
        data["megatron"] = _normalized_megatron(data["megatron"], path)
    bases = data.pop("extends", None)
    if bases is None:
        return _drop_nulls(data)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: extends={bases!r} must be a file name or a list of file names")
    merged: dict = {}
    here = os.path.dirname(os.path.abspath(path))
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(here, base)
        merged = merge(merged, load_tree(base_path, (*_chain, real), _read))
    return merge(merged, data)


def parse_override(text: str) -> Tuple[str, dict]:
    """``'a.b=value'`` -> ``('a.b', {'a': {'b': value}})`` (value parsed as bounded YAML; the key
    as it lands in the tree, ``megatron`` flags without ``--``). Raises ConfigError naming the
    ``--set``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. c2r.max_groups=2)")
    try:
        value = load_yaml_text(raw, f"--set {text}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own: take it as a plain string
    parts = key.split(".")
    if parts[0] == "megatron" and len(parts) >= 2:
        # Flags contain dots rarely but dashes always: re-join everything after the section.
        parts = ["megatron", normalize_flag(".".join(parts[1:]))]
    return ".".join(parts), nested(parts, value)


def nested(parts: Sequence[str], value: Any) -> dict:
    """``(['a', 'b'], v)`` -> ``{'a': {'b': v}}``."""
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    return tree


def normalize_flag(key: str) -> str:
    """``'--num-layers'`` and ``'num-layers'`` -> ``'num-layers'``."""
    return key[2:] if key.startswith("--") else key


def load_raw(
    path: str, overrides: Optional[Iterable[str]] = None
) -> Tuple[dict, List[Tuple[str, str]]]:
    """The merged tree of ``path`` (with extends) and ``overrides`` (``a.b=value`` strings), and
    ``[(dotted key, '--set a.b=value'), ...]`` saying which keys the overrides set, in order.
    Keys of ``megatron:`` come back without their ``--``."""
    tree = load_tree(path)
    origins = []
    for text in overrides or ():
        key, layer = parse_override(text)
        tree = merge(tree, layer)
        origins.append((key, f"--set {text}"))
    return tree, origins


def _normalized_megatron(section: dict, path: str) -> dict:
    out: dict = {}
    for key, value in section.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: megatron.{key!r}: flag names are strings like --num-layers")
        out[normalize_flag(key)] = value
    return out


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------
def checked(path: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (int, float, str, bool, Optional[X], Tuple[X, ...]).
    Raises ConfigError ``'<path>=<value> must be a <type>'`` (callers add the file or --set)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return checked(path, value, hint)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r} must be a list")
        return tuple(checked(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:  # pragma: no cover (a schema type we do not support)
        raise TypeError(f"unsupported config type {hint!r} for {path}")
    if not ok:
        raise ConfigError(f"{path}={value!r} must be a {hint.__name__}")
    return float(value) if hint is float else value
