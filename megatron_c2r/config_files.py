"""Reading run-config YAML files safely: ``extends:`` chains and ``--set dotted.key=value`` overrides.

This module knows nothing about what the sections mean (``megatron_c2r.config`` does); it turns
one file plus overrides into one plain nested dict.

Rules:
    * Files are read with ``yaml.safe_load``; they must exist, be regular files ending in
      ``.yaml``/``.yml`` and be under 1 MiB. The top level must be a mapping.
    * ``extends: base.yaml`` (or a list, applied left to right) names base files relative to the
      extending file. Bases are merged first, then the file itself on top. Cycles and chains
      deeper than 8 files are errors.
    * Merging: mappings merge key by key, recursively; any other value (lists included) replaces.
      A ``null`` value deletes the key it lands on, so a C2R variant can drop a flag its baseline
      sets (``--moe-router-num-groups: null``).
    * ``--set a.b=value``: ``value`` is parsed as YAML (``8`` -> int, ``true`` -> bool,
      ``[1, 2]`` -> list, ``null`` -> delete), then merged like one more file. Inside
      ``megatron:`` a key may be written with or without its leading ``--``
      (``--set megatron.num-layers=4``).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Optional

import yaml

MAX_FILE_BYTES = 1 << 20
MAX_EXTENDS_DEPTH = 8
YAML_SUFFIXES = (".yaml", ".yml")


class ConfigError(ValueError):
    """A bad run config; the message is one line naming the YAML path, the value and the fix."""


def read_yaml_file(path: str) -> dict:
    """Parse one YAML file into a dict (no ``extends`` handling). Raises ConfigError."""
    if not path.endswith(YAML_SUFFIXES):
        raise ConfigError(f"{path}: not a YAML file: config files end in .yaml or .yml")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file: check the path")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {size} bytes is too large for a run config (limit 1 MiB)")
    with open(path, "r", encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
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


def load_tree(path: str, _chain: tuple = ()) -> dict:
    """The file at ``path`` with its ``extends`` chain merged in (the ``extends`` key removed)."""
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(os.path.basename(p) for p in (*_chain, real))
        raise ConfigError(f"{path}: extends: cycle {cycle}: remove one of the links")
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path}: extends: chain deeper than {MAX_EXTENDS_DEPTH} files")
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
        merged = merge(merged, load_tree(base_path, (*_chain, real)))
    return merge(merged, data)


def parse_override(text: str) -> dict:
    """``'a.b=value'`` -> ``{'a': {'b': value}}`` (value parsed as YAML). Raises ConfigError."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. c2r.max_groups=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own: take it as a plain string
    parts = key.split(".")
    if parts[0] == "megatron" and len(parts) >= 2:
        # Flags contain dots rarely but dashes always: re-join everything after the section.
        parts = ["megatron", normalize_flag(".".join(parts[1:]))]
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    return tree


def normalize_flag(key: str) -> str:
    """``'--num-layers'`` and ``'num-layers'`` -> ``'num-layers'``."""
    return key[2:] if key.startswith("--") else key


def load_raw(path: str, overrides: Optional[Iterable[str]] = None) -> dict:
    """The merged tree of ``path`` (with extends) and ``overrides`` (``a.b=value`` strings).
    Keys of ``megatron:`` come back without their ``--``."""
    tree = load_tree(path)
    for text in overrides or ():
        tree = merge(tree, parse_override(text))
    return tree


def _normalized_megatron(section: dict, path: str) -> dict:
    out: dict = {}
    for key, value in section.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: megatron.{key!r}: flag names are strings like --num-layers")
        out[normalize_flag(key)] = value
    return out
