"""Collaboration sources for the planner: one ``LayerCollab`` per MoE layer, in file order.

Accepted inputs (``load_collaboration(path)``):
    *.npy                     raw co-activation counts, [E, E] or [layers, E, E] (no pickle)
    *.pt / *.pth              a tensor [E, E] / [layers, E, E]; or a dict:
                                - our routing dump {"top_indices": LongTensor [layers, T, K] or
                                  a list of [T, K], optional "padding_mask": bool [T] or
                                  [layers, T]}
                                - a (model) state dict with CollaborationTracker buffers: every
                                  key ending in "counts" ("...tracker.counts"), plus its
                                  "pending" sibling, in state-dict (= layer) order
    *.jsonl, or a directory   Megatron routing traces (``--moe-routing-trace-path``): one JSON
                              record per router call {"block", "layer", "topk", "top_indices",
                              ...}; every router_trace_rank*.jsonl of a directory is merged.
Matrices carry no top-k, so ``top_k`` must be given for them; traces and dumps carry full top-k
sets, which the planner uses to optimise distinct ranks per token directly.
Bad input (empty, truncated or damaged files, pickles, wrong shapes or dtypes) raises a one-line
ValueError naming the file, the problem and the fix (``megatron_c2r.files``), before anything is written.
Shape suffixes: the legend in ``megatron_c2r/placement/__init__.py`` (T tokens, K top-k, ...).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional

import numpy as np

from megatron_c2r.files import bounded_lines, load_npy, load_torch_file


@dataclasses.dataclass(frozen=True)
class LayerCollab:
    """Collaboration data of one MoE layer.

    counts_EE  float64 [E, E], symmetric, zero diagonal, >= 0: co-activation counts
    top_k      experts per token
    sets_UK    int64 [U, K] distinct top-k sets (rows sorted), or None for plain matrices
    weight_U   float64 [U] tokens per set, or None
    """

    counts_EE: np.ndarray
    top_k: int
    sets_UK: Optional[np.ndarray] = None
    weight_U: Optional[np.ndarray] = None

    @property
    def num_experts(self) -> int:
        return self.counts_EE.shape[0]

    @classmethod
    def from_counts(cls, counts, top_k: Optional[int], name: str = "counts") -> "LayerCollab":
        counts_EE = np.asarray(counts, dtype=np.float64)
        if counts_EE.ndim != 2 or counts_EE.shape[0] != counts_EE.shape[1]:
            raise ValueError(
                f"{name} has shape {tuple(counts_EE.shape)}: expected a square [E, E] matrix"
            )
        if not np.isfinite(counts_EE).all():
            raise ValueError(f"{name} contains NaN or inf: pass raw finite co-activation counts")
        if (counts_EE < 0).any():
            raise ValueError(
                f"{name} has negative counts (min {counts_EE.min():g}): pass raw co-activation "
                "counts, not centred or log values"
            )
        counts_EE = counts_EE.copy()
        np.fill_diagonal(counts_EE, 0.0)
        if not np.allclose(counts_EE, counts_EE.T, rtol=1e-6, atol=0):
            raise ValueError(
                f"{name} is not symmetric: co-activation counts are; pass C + C.T for a "
                "triangular matrix"
            )
        if top_k is None:
            raise ValueError(f"top_k is None for {name}: a matrix has no top-k, pass --top-k")
        if not 1 <= top_k <= counts_EE.shape[0]:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={counts_EE.shape[0]}]")
        return cls(counts_EE=counts_EE, top_k=int(top_k))

    @classmethod
    def from_top_indices(
        cls, top_indices_TK, num_experts: int, padding_mask_T=None, name: str = "top_indices"
    ) -> "LayerCollab":
        """From per-token top-k expert ids; padding tokens (mask True) are dropped."""
        topk_TK = np.asarray(top_indices_TK, dtype=np.int64)
        if topk_TK.ndim != 2 or topk_TK.shape[1] < 1:
            raise ValueError(f"{name} has shape {tuple(topk_TK.shape)}: expected [tokens, top_k]")
        if padding_mask_T is not None:
            keep_T = ~np.asarray(padding_mask_T, dtype=bool).reshape(-1)
            if keep_T.shape[0] != topk_TK.shape[0]:
                raise ValueError(
                    f"padding_mask has {keep_T.shape[0]} tokens but {name} has "
                    f"{topk_TK.shape[0]}: they must match"
                )
            topk_TK = topk_TK[keep_T]
        if topk_TK.size and (topk_TK.min() < 0 or topk_TK.max() >= num_experts):
            raise ValueError(
                f"{name} holds expert ids in [{topk_TK.min()}, {topk_TK.max()}], outside "
                f"[0, num_experts={num_experts}): pass the right --num-experts"
            )
        sorted_TK = np.sort(topk_TK, axis=1)
        if (np.diff(sorted_TK, axis=1) == 0).any():
            raise ValueError(f"{name} repeats an expert within one token: not a top-k set")
        sets_UK, weight_U = np.unique(sorted_TK, axis=0, return_counts=True)
        top_k = sets_UK.shape[1]
        counts_EE = np.zeros(num_experts * num_experts)
        if len(sets_UK):
            flat = (sets_UK[:, :, None] * num_experts + sets_UK[:, None, :]).reshape(len(sets_UK), -1)
            counts_EE = np.bincount(
                flat.ravel(), weights=np.repeat(weight_U, top_k * top_k).astype(np.float64),
                minlength=num_experts * num_experts,
            )
        counts_EE = counts_EE.reshape(num_experts, num_experts)
        np.fill_diagonal(counts_EE, 0.0)
        return cls(counts_EE, top_k, sets_UK.astype(np.int64), weight_U.astype(np.float64))


def _check_path(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"collaboration source {path!r} does not exist")
    return path


def _numeric(array, name: str) -> np.ndarray:
    """float64 copy of a numeric array; one-line error for anything else (strings, bools...)."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} holds dtype {arr.dtype}: expected numeric co-activation counts")
    return arr.astype(np.float64)


def _layers_from_matrix(array, top_k: Optional[int], name: str) -> list[LayerCollab]:
    arr = _numeric(array, name)
    if arr.size == 0:
        raise ValueError(f"{name} is an empty array (shape {tuple(arr.shape)}): expected "
                         "co-activation counts [E, E] or [layers, E, E] with E >= 2")
    if arr.ndim == 2:
        return [LayerCollab.from_counts(arr, top_k, name)]
    if arr.ndim == 3:
        return [LayerCollab.from_counts(m, top_k, f"{name}[{i}]") for i, m in enumerate(arr)]
    raise ValueError(f"{name} has shape {tuple(arr.shape)}: expected [E, E] or [layers, E, E]")


# No MoE model has more routed experts than this; an expert id past it is a damaged or hostile
# file, refused before the [E, E] counts (E**2 values) are allocated.
MAX_EXPERTS = 4096
MAX_LAYERS = 1024  # MoE layers (decoder + MTP) a routing trace may name


def _infer_num_experts(per_layer: list[np.ndarray], num_experts: Optional[int]) -> int:
    if num_experts is not None:
        return int(num_experts)
    highest = max((int(t.max()) for t in per_layer if t.size), default=-1)
    if highest >= MAX_EXPERTS:
        raise ValueError(
            f"the routing data names expert id {highest}, beyond the {MAX_EXPERTS} experts any "
            "model has: pass the model's --num-experts, or check the file")
    return highest + 1


def _int_array(value, name: str) -> np.ndarray:
    import torch  # only dumps (.pt) get here

    if torch.is_tensor(value):
        value = value.cpu().numpy()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{name} is not an integer array (got {type(value).__name__} of dtype "
                         f"{arr.dtype}): a routing dump holds top-k expert ids [tokens, K]")
    return arr


def _layers_from_dump(obj: dict, num_experts: Optional[int], name: str) -> list[LayerCollab]:
    top = obj["top_indices"]
    if not isinstance(top, (list, tuple)) and getattr(top, "ndim", 0) != 3:
        raise ValueError(f"{name}: 'top_indices' must be a [layers, tokens, K] tensor or a list of "
                         f"[tokens, K] tensors, got {type(top).__name__}")
    per_layer = [_int_array(t, f"{name}: top_indices[{i}]") for i, t in enumerate(top)]
    if not per_layer:
        raise ValueError(f"{name}: 'top_indices' holds no layers")
    pad = obj.get("padding_mask")
    if pad is not None:
        pad = _int_array(pad, f"{name}: padding_mask").astype(bool)
    num_experts = _infer_num_experts(per_layer, num_experts)
    out = []
    for i, topk_TK in enumerate(per_layer):
        pad_T = None if pad is None else (pad if pad.ndim == 1 else pad[i])
        out.append(LayerCollab.from_top_indices(topk_TK, num_experts, pad_T, f"{name}[{i}]"))
    return out


def _layers_from_state_dict(sd: dict, top_k: Optional[int], name: str) -> list[LayerCollab]:
    import torch  # only state dicts (.pt) get here

    keys = [k for k in sd if isinstance(k, str) and (k == "counts" or k.endswith(".counts"))]
    if not keys:
        raise ValueError(
            f"{name} is a dict without 'top_indices' or any '*counts' tracker buffer: pass a "
            "routing dump, a tracker/model state dict, or a matrix"
        )
    layers = []
    for key in keys:
        pending_key = key[: -len("counts")] + "pending"
        parts = [sd[key]] + ([sd[pending_key]] if pending_key in sd else [])
        if not all(torch.is_tensor(t) for t in parts):
            raise ValueError(f"{name}: {key!r} is a {type(sd[key]).__name__}, not a tracker "
                             "count tensor [E, E]")
        counts = sum(_numeric(t.cpu().numpy(), f"{name}:{key}") for t in parts)
        layers.append(LayerCollab.from_counts(counts, top_k, f"{name}:{key}"))
    return layers


def _trace_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "router_trace_rank*.jsonl")))
        if not files:
            raise ValueError(
                f"directory {path!r} has no router_trace_rank*.jsonl: point --collab at a "
                "Megatron --moe-routing-trace-path directory or a file"
            )
        return files
    return [path]


def _layers_from_traces(path: str, num_experts: Optional[int]) -> list[LayerCollab]:
    per_key: dict[tuple, list[np.ndarray]] = {}
    for file, lineno, line in bounded_lines(_trace_files(path), "routing trace"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            top = np.asarray(rec["top_indices"], dtype=np.int64).reshape(-1, int(rec["topk"]))
            key = (rec.get("block", "decoder") != "decoder", rec.get("mtp_idx") or 0,
                   int(rec["layer"]))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(
                f"{file}:{lineno} is not a routing-trace record ({type(exc).__name__}): expected "
                "JSON with 'layer', 'topk', 'top_indices'"
            ) from None
        per_key.setdefault(key, []).append(top)
    if not per_key:
        raise ValueError(f"routing trace {path!r} has no records")
    if len(per_key) > MAX_LAYERS:  # each layer becomes an [E, E] count matrix
        raise ValueError(
            f"routing trace {path!r} names {len(per_key)} MoE layers, more than the {MAX_LAYERS} "
            "any model has: check the file's 'layer' (and 'block', 'mtp_idx') fields")
    keys = sorted(per_key)
    stacked = [np.concatenate(per_key[k]) for k in keys]
    num_experts = _infer_num_experts(stacked, num_experts)
    return [
        LayerCollab.from_top_indices(t, num_experts, name=f"{path} layer {k[2]}")
        for k, t in zip(keys, stacked)
    ]


def _layers_from_torch_file(path: str, top_k: Optional[int], num_experts: Optional[int]):
    import torch  # only .pt sources need it

    obj = load_torch_file(path, "collaboration source")
    if torch.is_tensor(obj):
        if obj.is_complex() or obj.dtype == torch.bool:
            raise ValueError(f"{path} holds a {obj.dtype} tensor: expected co-activation counts")
        return _layers_from_matrix(obj.to(torch.float64).numpy(), top_k, path)
    if isinstance(obj, dict) and "top_indices" in obj:
        return _layers_from_dump(obj, num_experts, path)
    if isinstance(obj, dict):
        return _layers_from_state_dict(obj, top_k, path)
    raise ValueError(f"{path} holds a {type(obj).__name__}: expected a tensor or a dict")


def load_collaboration(
    path: str, *, top_k: Optional[int] = None, num_experts: Optional[int] = None
) -> list[LayerCollab]:
    """One ``LayerCollab`` per MoE layer from any supported source (module docstring).

    ``top_k`` is required for matrices and checked against traces/dumps when given;
    ``num_experts`` overrides the ``max id + 1`` inferred from traces/dumps. Files are read
    through ``megatron_c2r.files`` (bounded, nothing unpickled beyond tensors and containers).
    """
    _check_path(path)
    lower = path.lower()
    if os.path.isdir(path) or lower.endswith(".jsonl"):
        layers = _layers_from_traces(path, num_experts)
    elif lower.endswith(".npy"):
        layers = _layers_from_matrix(load_npy(path, "collaboration source"), top_k, path)
    elif lower.endswith((".pt", ".pth")):
        layers = _layers_from_torch_file(path, top_k, num_experts)
    else:
        raise ValueError(
            f"collaboration source {path!r} has an unknown extension: use .npy, .pt, .jsonl "
            "or a trace directory"
        )
    for i, layer in enumerate(layers):
        if top_k is not None and layer.top_k != top_k:
            raise ValueError(f"--top-k {top_k} but layer {i} of {path} routes top-{layer.top_k}")
        if num_experts is not None and layer.num_experts != num_experts:
            raise ValueError(
                f"--num-experts {num_experts} but layer {i} of {path} has {layer.num_experts}"
            )
    return layers


def synthetic_top_indices(
    num_experts: int, top_k: int, num_tokens: int, num_clusters: int, strength: float, seed: int
) -> np.ndarray:
    """int64 [T, K] top-k sets with planted collaboration, for tests and benchmarks.

    Experts are dealt into ``num_clusters`` hidden clusters (randomly labelled); each token has a
    topic cluster whose experts get ``strength`` added to standard-normal logits. strength=0 is
    uniform routing."""
    rng = np.random.default_rng(seed)
    cluster_E = rng.permutation(np.arange(num_experts) % num_clusters)
    topic_T = rng.integers(0, num_clusters, num_tokens)
    logits_TE = rng.standard_normal((num_tokens, num_experts))
    logits_TE += strength * (cluster_E[None, :] == topic_T[:, None])
    return np.argpartition(-logits_TE, top_k - 1, axis=1)[:, :top_k].astype(np.int64)
