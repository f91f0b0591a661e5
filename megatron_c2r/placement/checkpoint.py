"""Apply a plan to a Megatron torch_dist checkpoint offline (one CPU process).

    megatron-c2r convert --load CKPT --plan plan.json --save OUT

CKPT is a torch_dist checkpoint directory (metadata.json) or a Megatron-LM save directory
(latest_checkpointed_iteration.txt -> iter_XXXXXXX/); OUT gets the same layout. Every tensor is
loaded whole (the format reshards on load, so EP/TP/PP of the writer do not matter), the MoE
ones are relabelled, and everything is written back with its key, so any parallel layout loads
the result.

Which tensors move (ShardedTensor keys; a leading layer axis when the key has one; the same rules
match optimizer keys that embed a model key, e.g. "optimizer.state.exp_avg.<key>"):
    <p>router.weight / bias / expert_bias          rows
    <p>router.tracker.counts / pending             rows and columns (C2RRouter)
    <p>router.top_t_lists                          rows, and the ids they hold (C2RRouter)
    <p>router.expert_to_group                      rows, unless it is the contiguous default
    <p>experts.experts.<name>                      the expert axis (SequentialMLP, GroupedMLP and
                                                   TEGroupedMLP share this layout)
    <p>experts.experts.<id>.<name>                 key renamed (singleton_local_shards)
    <p>experts.experts.*._extra_state objects      their expert offset
Layers: the MoE prefixes <p> (from router.weight keys), decoder first, layer axis in order,
map to plan layers 0, 1, ... Everything is validated before anything is written; the output is
written to a temporary sibling directory and renamed into place.
Not supported: legacy per-rank (mp_rank_*) checkpoints, flat DistributedOptimizer buffers
("optimizer.distributed.*", pass drop_optimizer=True), models mixing dense and MoE layers in
one layer axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch

from megatron_c2r.placement.plan_file import Plan

_ROUTER_ROWS = re.compile(r"router\.(weight|bias|expert_bias)$")
_ROUTER_BOTH = re.compile(r"router\.tracker\.(counts|pending)$")
_ROUTER_SCALAR = re.compile(r"router\.(constraint_active|tracker\.(tokens|pending_tokens))$")
_SINGLETON = re.compile(r"^(.*experts\.experts\.)(\d+)\.(.*)$")


@dataclasses.dataclass(frozen=True)
class CheckpointDir:
    path: str  # the torch_dist directory (with metadata.json)
    iteration_dir: Optional[str] = None  # "iter_0000100" when inside a Megatron-LM save dir
    tracker_text: Optional[str] = None


def resolve_checkpoint(path: str) -> CheckpointDir:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is not a directory")
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        resolved = resolve_checkpoint(os.path.join(path, sub))
        return CheckpointDir(resolved.path, sub, text)
    meta = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta):
        legacy = any(n.startswith("mp_rank_") for n in os.listdir(path))
        why = "a legacy per-rank checkpoint" if legacy else "not a torch_dist checkpoint"
        raise ValueError(f"{path!r} is {why} (no metadata.json): save it with "
                         "--ckpt-format torch_dist first")
    backend = json.load(open(meta)).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{path!r} has sharded_backend={backend!r}: only torch_dist is supported")
    return CheckpointDir(path)


def _moe_prefixes(tensors: dict) -> list[tuple[str, int, bool]]:
    """(prefix, layers, has_layer_axis) per MoE module family, decoder first."""
    found = {}
    for key, t in tensors.items():
        if key.endswith("router.weight") and not key.startswith("optimizer"):
            prefix = key[: -len("router.weight")]
            found[prefix] = (t.shape[0], True) if t.dim() == 3 else (1, False)
    return [(p, *found[p]) for p in sorted(found, key=lambda p: (not p.startswith("decoder"), p))]


def _orders_by_prefix(prefixes, plan: Plan) -> dict:
    """prefix -> (per-layer orders as int64 tensors, has_layer_axis); plan layers in order."""
    out, start = {}, 0
    for prefix, n, has_axis in prefixes:
        out[prefix] = ([torch.tensor(plan.layers[start + i].order) for i in range(n)], has_axis)
        start += n
    return out


def _permute_axis(t: torch.Tensor, axis: int, order: torch.Tensor) -> torch.Tensor:
    return t.index_select(axis, order)


def _per_layer(t: torch.Tensor, has_layer_axis: bool, orders: list, fn) -> torch.Tensor:
    """Apply fn(tensor_without_layer_axis, order) per layer."""
    if not has_layer_axis:
        return fn(t, orders[0])
    return torch.stack([fn(t[l], orders[l]) for l in range(t.shape[0])])


def _relabel_router_tensor(name: str, t, has_layer_axis, orders, key):
    """name: the key's part after 'router.'."""
    def rows(x, o):
        return _permute_axis(x, 0, o)

    if _ROUTER_ROWS.search("router." + name):
        return _per_layer(t, has_layer_axis, orders, rows)
    if _ROUTER_BOTH.search("router." + name):
        return _per_layer(t, has_layer_axis, orders, lambda x, o: x[o][:, o])
    if name == "top_t_lists":
        def lists(x, o):
            inverse = torch.empty_like(o)
            inverse[o] = torch.arange(len(o))
            return inverse[x[o]] if x.numel() else x
        return _per_layer(t, has_layer_axis, orders, lists)
    if name == "expert_to_group":
        def groups(x, o):
            num_groups = int(x.max()) + 1
            default = torch.arange(len(x)) // (len(x) // num_groups)
            return x if torch.equal(x.cpu(), default) else x[o]
        return _per_layer(t, has_layer_axis, orders, groups)
    if _ROUTER_SCALAR.search("router." + name):
        return t
    raise ValueError(f"checkpoint key {key!r}: unknown router state, cannot relabel it safely "
                     "(extend megatron_c2r.placement.checkpoint)")


def relabel_tensors(tensors: dict, plan: Plan, drop_optimizer: bool = False) -> dict:
    """{key: tensor} -> {key: tensor} with every MoE tensor relabelled (pure; raises first)."""
    prefixes = _moe_prefixes(tensors)
    if not prefixes:
        raise ValueError("checkpoint has no MoE layers (no '*router.weight' key): nothing to "
                         "relabel")
    num_layers = sum(n for _, n, _ in prefixes)
    weight = tensors[prefixes[0][0] + "router.weight"]
    plan.check_matches(num_experts=weight.shape[-2], num_layers=num_layers, what="the checkpoint")
    orders_by_prefix = _orders_by_prefix(prefixes, plan)
    out = {}
    for key, t in tensors.items():
        if key.startswith("optimizer.distributed."):
            if drop_optimizer:
                continue
            raise ValueError(f"checkpoint key {key!r} is a flat DistributedOptimizer buffer that "
                             "mixes experts: convert without optimizer state (--drop-optimizer)")
        if drop_optimizer and key.startswith("optimizer"):
            continue
        hits = [p for p in orders_by_prefix if p in key]
        if not hits:
            out[key] = t
            continue
        prefix = max(hits, key=len)
        orders, has_axis = orders_by_prefix[prefix]
        rest = key[key.index(prefix) + len(prefix):]
        single = _SINGLETON.match(rest)
        if rest.startswith("router."):
            out[key] = _relabel_router_tensor(rest[len("router."):], t, has_axis, orders, key)
        elif single:
            continue  # handled below, by family
        elif rest.startswith("experts.experts."):
            out[key] = _per_layer(t, has_axis, orders, lambda x, o: _permute_axis(x, 0, o))
        else:
            out[key] = t  # shared experts, layer norms, ...
    out.update(_relabel_singletons(tensors, orders_by_prefix))
    return out


def _relabel_singletons(tensors: dict, orders_by_prefix: dict) -> dict:
    """experts.experts.<id>.<name> keys: new key i holds, per layer l, old id order_l[i]."""
    out = {}
    for key in tensors:
        hits = [p for p in orders_by_prefix if p in key]
        if not hits:
            continue
        prefix = max(hits, key=len)
        head, rest = key[: key.index(prefix) + len(prefix)], key[key.index(prefix) + len(prefix):]
        m = _SINGLETON.match(rest)
        if not m:
            continue
        orders, has_axis = orders_by_prefix[prefix]
        new_id = int(m.group(2))
        def source(old_id):
            return tensors[f"{head}{m.group(1)}{old_id}.{m.group(3)}"]
        if has_axis:
            out[key] = torch.stack([source(int(orders[l][new_id]))[l] for l in range(len(orders))])
        else:
            out[key] = source(int(orders[0][new_id]))
    return out


def _relabel_objects(objects: dict, orders_by_prefix: dict) -> dict:
    """ShardedObjects (key, global_shape, offset) -> moved offset for expert _extra_state."""
    moved = {}
    for unique, (key, shape, offset, data) in objects.items():
        hits = [p for p in orders_by_prefix if p in key and "experts.experts." in key]
        if not hits or _SINGLETON.match(key[key.index(max(hits, key=len)) + len(max(hits, key=len)):]):
            moved[unique] = (key, shape, offset, data)
            continue
        orders, has_axis = orders_by_prefix[max(hits, key=len)]
        layer = offset[0] if has_axis else 0
        inverse = torch.empty_like(orders[layer])
        inverse[orders[layer]] = torch.arange(len(inverse))
        new_offset = tuple(offset[:-1]) + (int(inverse[offset[-1]]),)
        moved[unique] = (key, shape, new_offset, data)
    return moved


def convert_checkpoint(load: str, plan: Plan, save: str, drop_optimizer: bool = False) -> str:
    """Relabel checkpoint ``load`` with ``plan`` into ``save`` (must not exist). Returns the
    torch_dist directory written. Needs torch.distributed initialised (one process is enough)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_c2r import compat

    src = resolve_checkpoint(load)
    if os.path.exists(save) and os.listdir(save):
        raise FileExistsError(f"--save {save!r} exists and is not empty: pick a new directory")
    parent = os.path.dirname(os.path.abspath(save))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"parent directory {parent!r} of --save does not exist")

    metadata = load_sharded_metadata(src.path)
    loaded = dist_checkpointing.load(metadata, src.path, validate_access_integrity=False)
    common = dist_checkpointing.load_common_state_dict(src.path)
    tensors = {v.key: loaded[k] for k, v in metadata.items() if isinstance(v, ShardedTensor)}
    objects = {k: (v.key, v.global_shape, v.global_offset, loaded[k])
               for k, v in metadata.items() if isinstance(v, ShardedObject)}
    new_tensors = relabel_tensors(tensors, plan, drop_optimizer)  # validates everything
    new_objects = _relabel_objects(objects, _orders_by_prefix(_moe_prefixes(tensors), plan))

    sharded = dict(common)
    for key, t in new_tensors.items():
        sharded[key] = ShardedTensor.from_rank_offsets(key, t.contiguous(), replica_id=0)
    for unique, (key, shape, offset, data) in new_objects.items():
        if drop_optimizer and key.startswith("optimizer"):
            continue
        sharded[unique] = ShardedObject(key, data, tuple(shape), tuple(offset),
                                                   replica_id=0)

    tmp = tempfile.mkdtemp(prefix=".c2r-convert-", dir=parent)
    try:
        target = os.path.join(tmp, src.iteration_dir) if src.iteration_dir else tmp
        os.makedirs(target, exist_ok=True)
        compat.save_dist_checkpoint(sharded, target)
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
