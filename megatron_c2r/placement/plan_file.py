"""The plan file and the one plan-layer type (planner output, plan-file entry, replan result).

    {"num_experts": E, "ep_size": P, "top_k": K,
     "layers": [{"layer": 0,                                  # 0-based, in file order
                 "groups": [[expert ids on rank 0], [rank 1], ...],   # P groups of E/P
                 "expert_to_rank": [rank of expert 0, ...],           # E entries
                 "top_t_lists": [[L partners of expert 0], ...],      # only when --top-t given
                 "predicted_ranks_per_token": {"identity": x, "random": y, "planned": z},
                 "predicted_nodes_per_token": {...},      # hierarchical plans only
                 "predicted_busiest_rank_load": {...},    # busiest EP rank's tokens / mean
                 "predicted_busiest_node_load": {...},    # hierarchical plans only
                 "load_bound": {"max_load_imbalance": X, "smallest_rank": r,
                                "smallest_node": n, "smallest_exact": true},  # when bounded
                 "exact": true},       # locality predictions exact (full top-k sets) or estimated
                ...],
     "num_nodes": N}                   # hierarchical plans only: node n = ranks [n P/N, (n+1) P/N)

The busiest-load predictions are exact on every source (loads are known from traces and from
pair counts alike). ``load_bound`` records the requested bound and the smallest busiest/mean
any placement achieves (exact for small E, else the best found); where the request is below
that, the plan meets the smallest instead. Files without the optional keys (older planners)
read as before, with those fields None.

All expert ids in the file are in the labelling of the collaboration source (before relabelling).
Applying layer l relabels experts with ``order = concat(groups)`` (``permutation.
order_from_groups``): NEW expert i is OLD expert ``order[i]``, so group g becomes EP rank g's
contiguous block. ``top_t_lists_relabelled`` gives the lists in the new ids (the LISTS kind of
``permutation``), the form a router loaded after relabelling needs.
Shape suffixes: the legend in ``megatron_c2r/placement/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import torch

from megatron_c2r.files import read_json_file, write_text_atomic
from megatron_c2r.placement.permutation import LISTS, order_from_groups, permute


def expert_to_rank_from_groups(groups: Sequence[Sequence[int]], num_experts: int) -> list:
    """[E] rank of each expert (None for an expert in no group: a malformed plan)."""
    e2r: list = [None] * num_experts
    for g, members in enumerate(groups):
        for e in members:
            if 0 <= e < num_experts:
                e2r[e] = g
    return e2r


@dataclasses.dataclass(frozen=True)
class PlanLayer:
    """One MoE layer's placement. ``groups[g]`` = expert ids on EP rank g (source labelling);
    ``predicted_ranks_per_token`` = {identity, random, planned}, ``exact`` when computed from
    full top-k sets (traces, dumps) rather than estimated from pair counts. The optional
    predictions have the same keys: distinct nodes per token, busiest rank / node load over the
    mean; ``load_bound`` as in the module docstring (None when planned without a bound)."""

    layer: int
    groups: list[list[int]]
    expert_to_rank: list[int]
    predicted_ranks_per_token: dict[str, float]
    top_t_lists: Optional[list[list[int]]] = None
    exact: bool = False
    predicted_busiest_rank_load: Optional[dict[str, float]] = None
    predicted_nodes_per_token: Optional[dict[str, float]] = None
    predicted_busiest_node_load: Optional[dict[str, float]] = None
    load_bound: Optional[dict[str, Any]] = None

    @classmethod
    def from_groups(cls, layer: int, groups, predicted: dict[str, float], *,
                    top_t_lists=None, exact: bool = False, **optional) -> "PlanLayer":
        """``optional``: the predicted_* dicts and load_bound, by field name."""
        groups = [[int(e) for e in g] for g in groups]
        e2r = expert_to_rank_from_groups(groups, sum(len(g) for g in groups))
        return cls(layer, groups, e2r, dict(predicted), top_t_lists, exact, **optional)

    @property
    def order(self) -> list[int]:
        """NEW expert i is OLD expert order[i]."""
        return order_from_groups(self.groups)

    def top_t_lists_relabelled(self) -> Optional[list[list[int]]]:
        """Top-T lists in the new ids: row i = partners of new expert i, as new ids."""
        if self.top_t_lists is None:
            return None
        lists_EL = torch.tensor(self.top_t_lists, dtype=torch.int64)
        return permute(LISTS, lists_EL, torch.tensor(self.order)).tolist()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "groups": self.groups,
            "expert_to_rank": self.expert_to_rank,
        }
        if self.top_t_lists is not None:
            out["top_t_lists"] = self.top_t_lists
        out["predicted_ranks_per_token"] = self.predicted_ranks_per_token
        for key in OPTIONAL_LAYER_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["exact"] = self.exact
        return out


# PlanLayer fields written only when set, in this order; all but load_bound map to numbers.
OPTIONAL_LAYER_KEYS = ("predicted_nodes_per_token", "predicted_busiest_rank_load",
                       "predicted_busiest_node_load", "load_bound")


@dataclasses.dataclass(frozen=True)
class Plan:
    num_experts: int
    ep_size: int
    top_k: int
    layers: list[PlanLayer]
    num_nodes: Optional[int] = None  # hierarchical plans: nodes of ep_size / num_nodes ranks

    def __post_init__(self):
        validate_plan(self)

    def to_json(self) -> dict[str, Any]:
        out = {
            "num_experts": self.num_experts,
            "ep_size": self.ep_size,
            "top_k": self.top_k,
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.num_nodes is not None:
            out["num_nodes"] = self.num_nodes
        return out

    def check_matches(self, *, num_experts: int, num_layers: Optional[int] = None,
                      ep_size: Optional[int] = None, what: str = "the model") -> None:
        """Raise a one-line ValueError if this plan is for another E / layer count / EP size."""
        if num_experts != self.num_experts:
            raise ValueError(
                f"plan is for num_experts={self.num_experts} but {what} has {num_experts}: "
                "re-plan from this model's collaboration data"
            )
        if num_layers is not None and num_layers != len(self.layers):
            raise ValueError(
                f"plan has {len(self.layers)} layers but {what} has {num_layers} MoE layers: "
                "re-plan from this model's collaboration data"
            )
        if ep_size is not None and ep_size != self.ep_size:
            raise ValueError(
                f"plan is for ep_size={self.ep_size} but {what} runs with EP={ep_size}: "
                f"re-plan with --ep {ep_size}"
            )


def validate_plan(plan: Plan) -> None:
    """Groups form a balanced partition of range(E) consistent with expert_to_rank; top-T lists
    hold other experts' ids. One-line ValueError naming the field otherwise."""
    E, P = plan.num_experts, plan.ep_size
    if E < 1 or P < 1 or E % P:
        raise ValueError(f"num_experts={E} must be a positive multiple of ep_size={P}")
    if not 1 <= plan.top_k <= E:
        raise ValueError(f"top_k={plan.top_k} must be in [1, num_experts={E}]")
    if plan.num_nodes is not None and (plan.num_nodes < 1 or P % plan.num_nodes):
        raise ValueError(f"num_nodes={plan.num_nodes} must be >= 1 and divide ep_size={P}: "
                         "nodes hold equal blocks of EP ranks")
    for i, layer in enumerate(plan.layers):
        where = f"layers[{i}]"
        if layer.layer != i:
            raise ValueError(f"{where}.layer={layer.layer}: layers are 0-based in file order, "
                             f"expected {i}")
        if len(layer.groups) != P or any(len(g) != E // P for g in layer.groups):
            sizes = [len(g) for g in layer.groups]
            raise ValueError(f"{where}.groups has sizes {sizes}: expected {P} groups of {E // P}")
        flat = sorted(e for g in layer.groups for e in g)
        if flat != list(range(E)):
            raise ValueError(f"{where}.groups is not a partition of experts 0..{E - 1}: every "
                             "expert must appear exactly once")
        e2r = expert_to_rank_from_groups(layer.groups, E)
        if list(layer.expert_to_rank) != e2r:
            raise ValueError(f"{where}.expert_to_rank disagrees with groups: expected {e2r}")
        if layer.top_t_lists is not None:
            lists = layer.top_t_lists
            if len(lists) != E or len({len(r) for r in lists}) > 1:
                raise ValueError(f"{where}.top_t_lists must be {E} rows of equal length (the "
                                 "--top-t value)")
            for e, row in enumerate(lists):
                if any(not 0 <= p < E or p == e for p in row) or len(set(row)) != len(row):
                    raise ValueError(f"{where}.top_t_lists[{e}]={row}: ids must be distinct "
                                     f"experts in [0, {E}) other than {e}")


def _as_int(value) -> int:
    """An int from JSON; floats and bools are refused (1.5 or true is not an expert id)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r:.40} is not an integer")
    return value


def _numbers(value, where: str, allow: tuple = ()) -> dict:
    """{str: float} from a JSON object of numbers (values of the ``allow`` types kept as they
    are); one-line ValueError naming ``where`` otherwise."""
    try:
        return {str(k): v if isinstance(v, allow) else float(v) for k, v in value.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{where}={value!r:.80}: expected an object of numbers") from None


def _require(obj: dict, key: str, where: str):
    if key not in obj:
        raise ValueError(f"{where} has no {key!r}: not a megatron-c2r plan file")
    return obj[key]


def plan_from_json(obj: Any, where: str = "plan") -> Plan:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a {type(obj).__name__}: expected a JSON object")
    layers_json = _require(obj, "layers", where)
    if not isinstance(layers_json, list):
        raise ValueError(f"{where}.layers is a {type(layers_json).__name__}: expected a list")
    layers = []
    for i, lo in enumerate(layers_json):
        w = f"{where}.layers[{i}]"
        if not isinstance(lo, dict):
            raise ValueError(f"{w} is a {type(lo).__name__}: expected an object")
        try:
            groups = [[_as_int(e) for e in g] for g in _require(lo, "groups", w)]
            e2r = [_as_int(r) for r in _require(lo, "expert_to_rank", w)]
            top_t = lo.get("top_t_lists")
            top_t = None if top_t is None else [[_as_int(e) for e in row] for row in top_t]
            layer_idx = _as_int(_require(lo, "layer", w))
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(w):
                raise
            raise ValueError(f"{w} has a non-integer expert id ({exc}): ids are ints") from None
        pred = _numbers(lo.get("predicted_ranks_per_token", {}), f"{w}.predicted_ranks_per_token")
        optional = {key: lo.get(key) for key in OPTIONAL_LAYER_KEYS}
        for key in OPTIONAL_LAYER_KEYS[:-1]:
            if optional[key] is not None:
                optional[key] = _numbers(optional[key], f"{w}.{key}")
        if optional["load_bound"] is not None:
            optional["load_bound"] = _numbers(optional["load_bound"], f"{w}.load_bound",
                                              allow=(bool, type(None)))
        layers.append(PlanLayer(layer_idx, groups, e2r, pred, top_t, lo.get("exact") is True,
                                **optional))
    sizes = {}
    for key in ("num_experts", "ep_size", "top_k", "num_nodes"):
        if key == "num_nodes" and key not in obj:
            continue
        value = _require(obj, key, where)
        try:
            sizes[key] = _as_int(value)
        except TypeError:
            raise ValueError(f"{where}.{key}={value!r:.40}: expected an integer") from None
    try:
        return Plan(layers=layers, **sizes)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def write_plan(plan: Plan, path: str) -> None:
    """Write atomically (temp file in the same directory + os.replace): readers never see a
    half-written plan, and a failure leaves any previous file untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory {directory!r} does not exist")
    obj = plan.to_json()
    # One layer per line: readable with grep/diff, and small for E=256.
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items() if k != "layers")
    body = ",\n".join("  " + json.dumps(layer) for layer in obj["layers"])
    text = "{\n" + head + ',\n "layers": [\n' + body + "\n ]\n}\n"
    write_text_atomic(path, text, prefix=".plan-")


def read_plan(path: str) -> Plan:
    """The validated plan in ``path`` (size-bounded read; one-line errors naming the field)."""
    return plan_from_json(read_json_file(path, "plan file"), where=path)
