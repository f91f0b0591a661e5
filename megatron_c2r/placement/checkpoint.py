"""Apply a plan to a Megatron torch_dist checkpoint offline (one CPU process), tensor by tensor.

    megatron-c2r convert --load CKPT --plan plan.json --save OUT

CKPT is a torch_dist checkpoint directory (metadata.json) or a Megatron-LM save directory
(latest_checkpointed_iteration.txt -> iter_XXXXXXX/); OUT gets the same layout. The format
reshards on load, so the writer's EP/TP/PP do not matter and any parallel layout loads the
result.

Which tensors move, and how, is ``permutation.checkpoint_rule`` (the same table the live router
uses): per MoE prefix <p> (from "*router.weight" keys; a leading layer axis when the key has
one), <p>router.* by ``ROUTER_STATE``, <p>experts.experts.<name> on the expert axis,
<p>experts.experts.<id>.<name> renamed (singleton_local_shards), per-expert ``_extra_state``
objects moved to their new expert; optimizer keys that embed a model key
("optimizer.state.exp_avg.<key>") follow that key. MoE prefixes, decoder first and layer axis in
order, map to plan layers 0, 1, ...

Memory: ``convert_checkpoint`` never holds the model. Each output chunk (one MoE layer of one
tensor; other tensors in pieces of at most ``CHUNK_BYTES``) is read, relabelled and written
when torch DCP writes it (``compat.save_dist_checkpoint_streaming``), so peak memory is about the
largest stored chunk of the input plus one output chunk. ``relabel_tensors`` is the whole-tensor
oracle it is tested against.

Everything is validated before anything is written; the output is written to a temporary sibling
directory and renamed into place.
Optimizer state: Megatron-LM's default distributed-optimizer format (``dp_reshardable``, flat
"optimizer.distributed.*" buckets) records no parameter boundaries inside a bucket (they follow
from the model's module order and DDP bucketing, not stored), so expert slices cannot be found
offline: such checkpoints are refused naming the save flag that writes per-parameter state
(``--dist-ckpt-optim-fully-reshardable``), or converted without optimizer state
(``--drop-optimizer``).
Not supported: legacy per-rank (mp_rank_*) checkpoints; models mixing dense and MoE layers in one
layer axis.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import torch

from megatron_c2r.files import read_json_file
from megatron_c2r.placement.permutation import (
    RENAME,
    SAME,
    checkpoint_rule,
    inverse_order,
    moved_expert_offset,
    permute,
    renamed_expert_key,
    singleton_expert_key,
)
from megatron_c2r.placement.plan_file import Plan

CHUNK_BYTES = 256 << 20  # pieces of tensors that do not move (embeddings, attention, ...)
# Optimizer keys, with the "chained_<i>." prefix a ChainedOptimizer adds unless the save passed
# chained_optim_avoid_prefix (Megatron-LM does); flat DistributedOptimizer buckets among them.
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")
_FLAT_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.distributed\.")

DP_RESHARDABLE_FIX = (
    "re-save it with Megatron-LM's --dist-ckpt-optim-fully-reshardable (per-parameter optimizer "
    "state; e.g. --load it and --save with that flag), or convert without optimizer state "
    "(--drop-optimizer, then train with --no-load-optim)"
)


@dataclasses.dataclass(frozen=True)
class CheckpointDir:
    path: str  # the torch_dist directory (with metadata.json)
    iteration_dir: Optional[str] = None  # "iter_0000100" when inside a Megatron-LM save dir
    tracker_text: Optional[str] = None


def resolve_checkpoint(path: str) -> CheckpointDir:
    """The torch_dist directory of ``path``; one-line errors for anything else."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is not a directory")
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read(64).strip()
        if text != "release" and not text.isdigit():
            raise ValueError(f"{tracker!r} holds {text!r}: expected an iteration number or "
                             "'release' (as Megatron-LM writes it)")
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        resolved = resolve_checkpoint(os.path.join(path, sub))
        return CheckpointDir(resolved.path, sub, text)
    meta = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta):
        legacy = any(n.startswith("mp_rank_") for n in os.listdir(path))
        why = "a legacy per-rank checkpoint" if legacy else "not a torch_dist checkpoint"
        raise ValueError(f"{path!r} is {why} (no metadata.json): save it with "
                         "--ckpt-format torch_dist first")
    content = read_json_file(meta, "checkpoint metadata", max_bytes=1 << 20)
    backend = content.get("sharded_backend") if isinstance(content, dict) else None
    if backend != "torch_dist":
        raise ValueError(f"{path!r} has sharded_backend={backend!r}: only torch_dist is supported")
    return CheckpointDir(path)


# ------------------------------------------------------------------------------------------
# Which key is what (metadata only: shapes, no data)
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MoEFamily:
    """One MoE module family: keys "<prefix>router.weight", ... (``layers`` MoE layers)."""

    prefix: str
    layers: int
    has_layer_axis: bool
    orders: tuple  # per layer: int64 [E] relabelling (plan layers in family order)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    key: str
    family: Optional[MoEFamily]  # None: not an MoE tensor
    rest: str  # the key after the family prefix
    kind: str  # a permutation kind, or RENAME


def moe_families(shapes: dict[str, tuple], plan: Plan) -> list[MoEFamily]:
    """MoE families from "*router.weight" keys (decoder first), checked against ``plan``."""
    found = {}
    for key, shape in shapes.items():
        if key.endswith("router.weight") and not _OPTIMIZER_KEY.match(key):
            stacked = len(shape) == 3  # [layers, E, H]; [E, H] without a layer axis
            found[key[: -len("router.weight")]] = (shape[0], True) if stacked else (1, False)
    if not found:
        raise ValueError("checkpoint has no MoE layers (no '*router.weight' key): nothing to "
                         "relabel")
    prefixes = sorted(found, key=lambda p: (not p.startswith("decoder"), p))
    weight_shape = shapes[prefixes[0] + "router.weight"]
    plan.check_matches(num_experts=weight_shape[-2], num_layers=sum(found[p][0] for p in prefixes),
                       what="the checkpoint")
    families, start = [], 0
    for prefix in prefixes:
        layers, has_axis = found[prefix]
        orders = tuple(torch.tensor(plan.layers[start + i].order) for i in range(layers))
        families.append(MoEFamily(prefix, layers, has_axis, orders))
        start += layers
    return families


def key_rule(key: str, families: list[MoEFamily]) -> KeyRule:
    """The rule of one key (optimizer keys embed model keys: the longest prefix inside wins)."""
    hits = [f for f in families if f.prefix in key]
    if not hits:
        return KeyRule(key, None, key, SAME)
    family = max(hits, key=lambda f: len(f.prefix))
    rest = key[key.index(family.prefix) + len(family.prefix):]
    return KeyRule(key, family, rest, checkpoint_rule(rest, key))


def check_rule_shape(rule: KeyRule, shape: tuple) -> None:
    """A relabelled tensor must have the family's layer axis and then an expert axis of E."""
    family = rule.family
    if rule.kind == SAME:
        return
    num_experts = len(family.orders[0])
    axis = 1 if family.has_layer_axis else 0
    want_layers = not family.has_layer_axis or (len(shape) > 0 and shape[0] == family.layers)
    want_experts = rule.kind == RENAME or (len(shape) > axis and shape[axis] == num_experts)
    if not (want_layers and want_experts):
        layout = f"[{family.layers} layers, {num_experts} experts, ...]" if family.has_layer_axis \
            else f"[{num_experts} experts, ...]"
        raise ValueError(f"checkpoint key {rule.key!r} has shape {tuple(shape)}, expected "
                         f"{layout} like {family.prefix}router.weight: not a layout convert knows")


def _rename_source(rule: KeyRule, layer: int) -> str:
    """The key whose tensor per-expert key ``rule.key`` takes at ``layer``."""
    head = rule.key[: len(rule.key) - len(rule.rest)]
    return head + renamed_expert_key(rule.rest, rule.family.orders[layer])


def check_optimizer_format(keys, drop_optimizer: bool, path: str) -> None:
    """One-line refusal of flat distributed-optimizer buckets (see the module docstring)."""
    flat = sorted(k for k in keys if _FLAT_OPTIMIZER_KEY.match(k))
    if flat and not drop_optimizer:
        raise ValueError(
            f"checkpoint {path!r} holds the distributed optimizer's dp_reshardable state "
            f"({flat[0]!r}, ...: flat buckets that mix parameters and record no boundaries), "
            f"which cannot be relabelled offline: {DP_RESHARDABLE_FIX}"
        )


def _dropped(key: str, drop_optimizer: bool) -> bool:
    return drop_optimizer and _OPTIMIZER_KEY.match(key) is not None


# ------------------------------------------------------------------------------------------
# The whole-tensor oracle
# ------------------------------------------------------------------------------------------
def relabel_tensors(tensors: dict, plan: Plan, drop_optimizer: bool = False) -> dict:
    """{key: tensor} -> {key: tensor} with every MoE tensor relabelled (pure; validates first).
    Holds everything in memory: the reference ``convert_checkpoint`` is tested against."""
    check_optimizer_format(tensors, drop_optimizer, "(in memory)")
    families = moe_families({k: tuple(t.shape) for k, t in tensors.items()}, plan)
    rules = [key_rule(k, families) for k in tensors if not _dropped(k, drop_optimizer)]
    for rule in rules:
        check_rule_shape(rule, tuple(tensors[rule.key].shape))
    out = {}
    for rule in rules:
        t, family = tensors[rule.key], rule.family
        if rule.kind == SAME:
            out[rule.key] = t
            continue
        per_layer = []
        for layer in range(family.layers):
            order = family.orders[layer]
            if rule.kind == RENAME:
                src = tensors[_rename_source(rule, layer)]
                per_layer.append(src[layer] if family.has_layer_axis else src)
            else:
                per_layer.append(permute(rule.kind, t[layer] if family.has_layer_axis else t,
                                         order))
        out[rule.key] = torch.stack(per_layer) if family.has_layer_axis else per_layer[0]
    return out


def relabel_objects(objects: dict, families: list[MoEFamily], drop_optimizer: bool) -> dict:
    """ShardedObjects {unique: (key, global_shape, offset, data)} after relabelling: per-expert
    objects of "experts.experts.*" move to their new expert (offset), per-expert keys take the
    data of the old id they now stand for."""
    by_key_offset = {(key, tuple(off)): data for key, _, off, data in objects.values()}
    out = {}
    for unique, (key, shape, offset, data) in objects.items():
        if _dropped(key, drop_optimizer):
            continue
        rule = key_rule(key, families)
        family = rule.family
        if family is None or not rule.rest.startswith("experts.experts."):
            out[unique] = (key, shape, tuple(offset), data)
            continue
        layer = offset[0] if family.has_layer_axis else 0
        if singleton_expert_key(rule.rest) is not None:
            source = _rename_source(rule, layer)
            out[unique] = (key, shape, tuple(offset), by_key_offset[(source, tuple(offset))])
        else:
            new_offset = moved_expert_offset(offset, inverse_order(family.orders[layer]))
            out[unique] = (key, shape, new_offset, data)
    return out


# ------------------------------------------------------------------------------------------
# Streaming conversion
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One output chunk: rows [start, stop) of axis 0 of ``rule.key``; ``layer`` when the chunk
    is one MoE layer of a stacked tensor (or 0 for an unstacked MoE tensor), else None."""

    rule: KeyRule
    shape: tuple
    dtype: torch.dtype
    start: int
    stop: int
    layer: Optional[int]


def _chunks(rule: KeyRule, shape: tuple, dtype: torch.dtype) -> list[_Chunk]:
    family = rule.family
    if rule.kind != SAME:  # relabelled: one MoE layer (its whole expert axis) per chunk
        if family.has_layer_axis:
            return [_Chunk(rule, shape, dtype, l, l + 1, l) for l in range(shape[0])]
        return [_Chunk(rule, shape, dtype, 0, shape[0], 0)]
    if not shape:
        return [_Chunk(rule, shape, dtype, 0, 0, None)]
    row_bytes = max(1, torch.Size(shape[1:]).numel() * dtype.itemsize)
    rows = max(1, CHUNK_BYTES // row_bytes)
    return [_Chunk(rule, shape, dtype, a, min(a + rows, shape[0]), None)
            for a in range(0, max(shape[0], 1), rows)]


def _produce(chunk: _Chunk, read: Callable, shapes: dict) -> torch.Tensor:
    """The chunk's relabelled data (reads only what it needs)."""
    rule, family = chunk.rule, chunk.rule.family
    if rule.kind == SAME:
        return read(rule.key, chunk.shape, chunk.dtype, chunk.start, chunk.stop)
    if rule.kind == RENAME:
        source = _rename_source(rule, chunk.layer)
        return read(source, shapes[source][0], chunk.dtype, chunk.start, chunk.stop)
    data = read(rule.key, chunk.shape, chunk.dtype, chunk.start, chunk.stop)
    order = family.orders[chunk.layer]
    if family.has_layer_axis:
        return permute(rule.kind, data[0], order).unsqueeze(0)
    return permute(rule.kind, data, order)


def convert_checkpoint(load: str, plan: Plan, save: str, drop_optimizer: bool = False) -> str:
    """Relabel checkpoint ``load`` with ``plan`` into ``save`` (must not exist or be empty),
    tensor by tensor. Returns the torch_dist directory written. Needs torch.distributed
    initialised (one process is enough); nothing is written before every key is validated."""
    from megatron.core import dist_checkpointing  # heavy: only the convert command needs it
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_c2r import compat

    src = resolve_checkpoint(load)
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise FileExistsError(f"--save {save!r} exists and is not an empty directory: pick a new "
                              "directory")
    parent = os.path.dirname(os.path.abspath(save))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"parent directory {parent!r} of --save does not exist")

    metadata = load_sharded_metadata(src.path)  # shapes and dtypes only
    tensors = {v.key: v for v in metadata.values() if isinstance(v, ShardedTensor)}
    check_optimizer_format(tensors, drop_optimizer, src.path)
    shapes = {k: (tuple(v.global_shape), v.dtype) for k, v in tensors.items()}
    families = moe_families({k: s for k, (s, _) in shapes.items()}, plan)
    chunks = []
    for key, (shape, dtype) in shapes.items():
        if not _dropped(key, drop_optimizer):
            rule = key_rule(key, families)  # raises on unknown router state
            check_rule_shape(rule, shape)
            chunks += _chunks(rule, shape, dtype)
            if rule.kind == RENAME:
                for layer in range(rule.family.layers):
                    if _rename_source(rule, layer) not in shapes:
                        raise ValueError(f"checkpoint key {key!r}: per-expert key "
                                         f"{_rename_source(rule, layer)!r} is missing")
    object_meta = {u: v for u, v in metadata.items()
                   if isinstance(v, ShardedObject) and not _dropped(v.key, drop_optimizer)}
    loaded_objects = dist_checkpointing.load(dict(object_meta), src.path,
                                             validate_access_integrity=False) if object_meta else {}
    objects = relabel_objects(
        {u: (v.key, v.global_shape, v.global_offset, loaded_objects[u])
         for u, v in object_meta.items()}, families, drop_optimizer)
    common = dist_checkpointing.load_common_state_dict(src.path)

    reader = compat.DistCheckpointReader(src.path)
    by_offset = {}
    sharded = dict(common)
    for i, chunk in enumerate(chunks):
        rows = chunk.stop - chunk.start
        local = (rows, *chunk.shape[1:]) if chunk.shape else ()
        offset = (chunk.start,) + (0,) * (len(chunk.shape) - 1) if chunk.shape else ()
        sharded[f"{chunk.rule.key}//chunk{i}"] = ShardedTensor(
            chunk.rule.key, compat.placeholder_tensor(local, chunk.dtype), chunk.dtype, local,
            chunk.shape, offset, None, replica_id=0)
        by_offset[(chunk.rule.key, offset)] = chunk
    for unique, (key, shape, offset, data) in objects.items():
        sharded[unique] = ShardedObject(key, data, tuple(shape), tuple(offset), replica_id=0)

    def materialize(key, offset):
        return _produce(by_offset[(key, tuple(offset))], reader.read, shapes)

    tmp = tempfile.mkdtemp(prefix=".c2r-convert-", dir=parent)
    try:
        target = os.path.join(tmp, src.iteration_dir) if src.iteration_dir else tmp
        os.makedirs(target, exist_ok=True)
        compat.save_dist_checkpoint_streaming(sharded, target, materialize)
        if src.iteration_dir:
            with open(os.path.join(tmp, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(src.tracker_text)
        if os.path.isdir(save):
            os.rmdir(save)  # empty (checked above)
        os.replace(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(save, src.iteration_dir) if src.iteration_dir else save
