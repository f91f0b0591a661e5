"""Routing for the cluster cost model: which experts each of P x T tokens picks, per routing rule.

Two kinds of input (``cost.inputs.RoutingSource``):

* **Synthetic scores** (``uniform``, ``clustered``): every GPU draws T tokens' logits from its own
  seeded generator (iid normal; ``clustered`` adds +S to the experts of the token's planted
  cluster), turns them into Megatron's selection scores (logits for softmax routers, sigmoid
  scores for sigmoid routers) and applies each rule to the same scores: the config's rule and
  ours are compared on identical tokens.
* **A routing source file** (``placement.sources.load_collaboration``: Megatron routing traces,
  our routing dumps, tracker states, co-activation matrices). Traces and dumps hold each token's
  top-k set: GPUs sample T of those sets (with replacement, by frequency) and the config's
  routing *is* those sets. Tracker states and matrices hold only pair counts: token sets are
  sampled from them (first expert by its share of the counts, each next one by its
  co-activation with those already chosen), an approximation that keeps pair statistics, not
  higher-order ones. A file has no router scores, so our node rule is applied to pseudo-scores:
  a token's own experts first, then the experts that co-activate most with them; with M = 1
  that keeps each token on the node that held most of its experts.

Rules run through the router's own selection functions (``routing.functional.group_topk`` for
group rules, ``node_topk`` for node rules: our node-anchored routing and ``c2r.mode: node``).
Cold path, CPU, deterministic for a seed.
Shape suffixes: ``cost.model``'s (P GPUs, T tokens per GPU, E experts, K top-k, U distinct sets).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_c2r.cost.inputs import MoEShape, RoutingRule, RoutingSource
from megatron_c2r.cost.model import RoutingCounts, RowCounter
from megatron_c2r.placement.sources import LayerCollab, load_collaboration
from megatron_c2r.routing.functional import contiguous_groups, group_topk, node_topk
from megatron_c2r.routing.moge import group_balanced_topk

SOURCE_ROUTING = "source routing"  # the label of a file's own top-k sets


def select_experts(rule: RoutingRule, scores_TE: torch.Tensor, topk: int) -> torch.Tensor:
    """int64 [T, K] expert ids per token under ``rule`` (selection scores: higher is better),
    by the router's own selection functions."""
    if rule.num_groups is None:
        return scores_TE.topk(topk, dim=-1).indices
    num_experts = scores_TE.shape[1]
    groups_GN = torch.arange(num_experts).view(rule.num_groups, -1)
    if rule.mean_budget is not None:  # the router's budgeted rule itself
        budgeted = _budgeted_rule(rule, topk)
        no_lists = torch.zeros(num_experts, 0, dtype=torch.int64)
        tables = budgeted.tables(contiguous_groups(num_experts, rule.num_groups), no_lists)
        return budgeted.select(scores_TE, tables)
    if rule.balanced:
        return group_balanced_topk(scores_TE, topk, groups_GN)[1]
    if rule.num_nodes is not None:
        return node_topk(scores_TE, topk, groups_GN, rule.num_nodes, rule.max_groups,
                         anchored=rule.anchored, max_ranks_per_node=rule.max_ranks_per_node)[1]  # fmt: skip
    expert_to_group_E = contiguous_groups(num_experts, rule.num_groups)
    return group_topk(scores_TE, topk, expert_to_group_E, rule.num_groups, rule.max_groups,
                      anchored=rule.anchored, groups_GN=groups_GN)[1]  # fmt: skip


def _budgeted_rule(rule: RoutingRule, topk: int):
    """The router's ``BudgetedNodeRule`` / ``BudgetedGroupRule`` for a cost-model rule."""
    from megatron_c2r.routing.rules import BudgetedGroupRule, BudgetedNodeRule

    budget = dict(mean_budget=rule.mean_budget, relax_to=rule.relax_to, relax_by=rule.relax_by)
    if rule.num_nodes is not None:
        return BudgetedNodeRule(topk=topk, num_groups=rule.num_groups, max_groups=rule.num_groups,
                                num_nodes=rule.num_nodes, max_nodes=rule.max_groups,
                                max_ranks_per_node=rule.max_ranks_per_node, **budget)  # fmt: skip
    return BudgetedGroupRule(topk=topk, num_groups=rule.num_groups, max_groups=rule.max_groups, **budget)


def routing_map(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool [T, E] from int64 [T, K] expert ids (Megatron's routing_map)."""
    map_TE = torch.zeros(indices_TK.shape[0], num_experts, dtype=torch.bool)
    return map_TE.scatter_(1, indices_TK, True)


# --------------------------------------------------------------------------------------------
# Synthetic scores
# --------------------------------------------------------------------------------------------
def synthetic_scores(
    source: RoutingSource, shape: MoEShape, rank: int, seed: int, score_function: str = "softmax"
) -> torch.Tensor:
    """fp32 [T, E] selection scores of GPU ``rank``'s tokens (its own generator: seed, rank)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    logits_TE = torch.randn(shape.tokens_per_gpu, shape.num_experts, generator=gen)
    if source.kind == "clustered":
        # The planted clusters are a property of the model (one draw for all GPUs).
        cluster_gen = torch.Generator().manual_seed(seed)
        cluster_E = torch.randperm(shape.num_experts, generator=cluster_gen) % source.clusters
        topic_T = torch.randint(0, source.clusters, (shape.tokens_per_gpu,), generator=gen)
        logits_TE += source.strength * (cluster_E[None, :] == topic_T[:, None])
    return torch.sigmoid(logits_TE) if score_function == "sigmoid" else logits_TE


# --------------------------------------------------------------------------------------------
# Token sets from a routing source file
# --------------------------------------------------------------------------------------------
def load_source_layers(source: RoutingSource, shape: MoEShape) -> List[LayerCollab]:
    """The file's layers, checked against the model (E and k). Raises ValueError naming
    ``--routing``."""
    try:
        layers = load_collaboration(source.path, top_k=shape.topk)
    except ValueError as exc:
        raise ValueError(f"--routing {source.path}: {exc}") from None
    for i, layer in enumerate(layers):
        if layer.num_experts > shape.num_experts or layer.top_k != shape.topk:
            raise ValueError(
                f"--routing {source.path}: layer {i} routes top-{layer.top_k} of "
                f"{layer.num_experts} experts, the config top-{shape.topk} of "
                f"{shape.num_experts}: pass a routing source of this model"
            )
    return layers


def _counts_EE(layer: LayerCollab, num_experts: int) -> torch.Tensor:
    """fp32 [E, E] co-activation counts, padded to the model's E (a trace infers E from the
    highest id it saw)."""
    counts_EE = torch.zeros(num_experts, num_experts)
    n = layer.num_experts
    counts_EE[:n, :n] = torch.from_numpy(layer.counts_EE).float()
    return counts_EE


def sample_sets(layer: LayerCollab, shape: MoEShape, rank: int, seed: int) -> torch.Tensor:
    """int64 [T, K] token sets for GPU ``rank``: drawn from the file's sets by frequency, or
    (pair counts only) sampled expert by expert from the co-activation counts."""
    T, K = shape.tokens_per_gpu, shape.topk
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    if layer.sets_UK is not None and len(layer.sets_UK):
        weight_U = torch.from_numpy(layer.weight_U).double()
        pick_T = torch.multinomial(weight_U, T, replacement=True, generator=gen)
        return torch.from_numpy(layer.sets_UK)[pick_T]
    counts_EE = _counts_EE(layer, shape.num_experts).double()
    floor = 1e-9 * float(counts_EE.sum()) / max(counts_EE.numel(), 1) + 1e-12
    load_E = counts_EE.sum(dim=1) + floor
    chosen_TK = torch.empty(T, K, dtype=torch.int64)
    chosen_TK[:, 0] = torch.multinomial(load_E, T, replacement=True, generator=gen)
    taken_TE = routing_map(chosen_TK[:, :1], shape.num_experts)
    for j in range(1, K):
        weight_TE = counts_EE.index_select(0, chosen_TK[:, :j].flatten()).view(T, j, -1).sum(1)
        weight_TE = (weight_TE + floor).masked_fill(taken_TE, 0.0)
        chosen_TK[:, j] = torch.multinomial(weight_TE, 1, generator=gen).squeeze(1)
        taken_TE.scatter_(1, chosen_TK[:, j : j + 1], True)
    return chosen_TK


def pseudo_scores(sets_TK: torch.Tensor, counts_EE: torch.Tensor) -> torch.Tensor:
    """fp32 [T, E] selection scores for a token known only by its set: (K + 1) + affinity for
    its own experts, affinity in [0, 1) for the others, affinity = co-activation with the set /
    the row's largest. Any block's sum of top-k scores then ranks blocks by how many of the
    token's experts they hold first, by affinity second."""
    T, K = sets_TK.shape
    affinity_TE = counts_EE.index_select(0, sets_TK.flatten()).view(T, K, -1).sum(dim=1)
    affinity_TE = affinity_TE / (affinity_TE.amax(dim=1, keepdim=True) * (1 + 1e-6) + 1e-12)
    return affinity_TE + (K + 1) * routing_map(sets_TK, counts_EE.shape[0])


# --------------------------------------------------------------------------------------------
# Counting every rule over the EP group
# --------------------------------------------------------------------------------------------
def sample_counts(
    source: RoutingSource,
    shape: MoEShape,
    rules: Dict[str, Optional[RoutingRule]],
    *,
    seed: int = 0,
    score_function: str = "softmax",
    layer: Optional[LayerCollab] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, RoutingCounts]:
    """``{label: RoutingCounts}`` for each rule over the P GPUs' tokens (one GPU at a time).

    ``rules`` maps a label to a rule, or to None for a file's own sets (``SOURCE_ROUTING``);
    ``layer`` is the file's layer for file sources. ``progress(1)`` is called after each GPU.
    """
    counters = {label: RowCounter(shape) for label in rules}
    counts_EE = _counts_EE(layer, shape.num_experts) if layer is not None else None
    for rank in range(shape.ep_size):
        if source.kind == "file":
            sets_TK = sample_sets(layer, shape, rank, seed)
            scores_TE = pseudo_scores(sets_TK, counts_EE)
        else:
            sets_TK, scores_TE = None, synthetic_scores(source, shape, rank, seed, score_function)
        for label, rule in rules.items():
            if rule is None:
                if sets_TK is None:
                    raise ValueError(f"{label!r}: a synthetic source has no sets of its own")
                indices_TK = sets_TK
            else:
                indices_TK = select_experts(rule, scores_TE, shape.topk)
            counters[label].add(routing_map(indices_TK, shape.num_experts))
        if progress is not None:
            progress(1)
    return {label: counter.counts() for label, counter in counters.items()}


def mean_rows(rows_by_layer: List[List[dict]]) -> List[dict]:
    """The element-wise mean of ``cost.model.estimate`` rows over layers (same order)."""
    if len(rows_by_layer) == 1:
        return rows_by_layer[0]
    out = []
    for rows in zip(*rows_by_layer):
        merged = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, float):
                merged[key] = float(np.mean([r[key] for r in rows]))
        out.append(merged)
    return out


def sample_routings(
    source: RoutingSource,
    shape: MoEShape,
    config: RoutingRule,
    ours: RoutingRule,
    *,
    seed: int = 0,
    score_function: str = "softmax",
    layer_index: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Tuple[List[Dict[str, RoutingCounts]], str]:
    """Counts of the config's routing and ours, per layer of a file source (``layer_index``:
    one of them; None: every layer) or once for a synthetic source. Returns (one dict per
    layer, the config routing's label)."""
    if source.kind != "file":
        rules = {config.label: config, ours.label: ours}
        return [sample_counts(source, shape, rules, seed=seed, score_function=score_function,
                              progress=progress)], config.label  # fmt: skip
    layers = load_source_layers(source, shape)
    if layer_index is not None:
        if not 0 <= layer_index < len(layers):
            raise ValueError(f"--layer {layer_index}: {source.path} has layers 0..{len(layers) - 1}")
        layers = [layers[layer_index]]
    label = f"{SOURCE_ROUTING} ({source.label})"
    # Pseudo-scores rank a token's own experts first but not among themselves (a file has no
    # top-1): blocks are chosen by group score, i.e. the node(s) holding most of its experts.
    rules = {label: None, ours.label: dataclasses.replace(ours, anchored=False)}
    return [sample_counts(source, shape, rules, seed=seed, layer=layer, progress=progress)
            for layer in layers], label  # fmt: skip
