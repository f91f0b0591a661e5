"""What relabelling experts does to every kind of state: one table, for live modules and for
checkpoint tensors.

Convention (the whole package): a relabelling is ``order_E`` (int64 [E]): NEW expert i is OLD
expert ``order_E[i]``; ``inverse_E = inverse_order(order_E)`` maps the other way (old expert j
is new expert ``inverse_E[j]``). A plan is applied as ``order_from_groups(plan groups)``.

Kinds (expert axis first; a checkpoint's stacked tensors get one order per layer,
``permute_stacked``):
    ROWS    new[i] = old[order[i]]               router weight [E, H], bias [E], expert_bias
                                                 and its token counts [E]; expert weights on
                                                 their expert axis
    PAIRS   new[i, j] = old[order[i], order[j]]  tracker counts / pending [E, E]
    LISTS   new[i] = inverse[old[order[i]]]      top-T lists [E, L]: rows move AND the ids
                                                 they hold are translated
    GROUPS  expert_to_group [E]: see ``permute_groups`` (unchanged if contiguous, else ROWS)
    SAME    unchanged                            0-d state: constraint_active, token totals
Parameters carry their companions (``companions``): .grad, .main_grad and every optimizer-state
tensor of the parameter's shape (AdamW exp_avg / exp_avg_sq) take the parameter's kind; 0-d
optimizer state (step) stays.

Where the kinds apply:
    ROUTER_STATE    router attribute path = state-dict key suffix after "router." -> kind, for
                    the stock TopKRouter and C2RRouter; live (``permute_module_state_``) and in
                    checkpoints (``checkpoint_rule``). TRACKER_STATE is its tracker part.
    expert weights  live: ``local_expert_slots`` (SequentialMLP, GroupedMLP, TEGroupedMLP);
                    torch_dist keys: ``checkpoint_rule`` (the expert axis of
                    "experts.experts.<name>", per-expert keys "experts.experts.<id>.<name>"
                    renamed, per-expert ``_extra_state`` objects moved: ``moved_expert_offset``).
    optimizer       live torch.optim state: ``companions``; checkpoint keys that embed a model
                    key ("optimizer.state.exp_avg.<key>") follow that key's rule.

Pure torch: imports nothing from Megatron or the rest of megatron_c2r, so ``moe/`` and
the placement tools use it without import cycles (the tracker's state moves with its router:
``ROUTER_STATE``'s ``tracker.*`` entries).
Shape suffixes: the legend in ``megatron_c2r/placement/__init__.py``.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

ROWS, PAIRS, LISTS, GROUPS, SAME = "rows", "pairs", "lists", "groups", "same"
RENAME = "rename"  # checkpoint only: a per-expert key takes another expert's tensor

TRACKER_STATE: dict[str, str] = {
    "counts": PAIRS, "pending": PAIRS, "tokens": SAME, "pending_tokens": SAME,
}
ROUTER_STATE: dict[str, str] = {
    # megatron.core TopKRouter (non-persistent buffers are relabelled live, never saved)
    "weight": ROWS, "bias": ROWS, "expert_bias": ROWS,
    "local_tokens_per_expert": ROWS, "global_tokens_per_expert": ROWS, "ga_steps": SAME,
    # C2RRouter
    "top_t_lists": LISTS, "expert_to_group": GROUPS, "constraint_active": SAME,
    # per balance group (EP-rank group or node), not per expert: groups keep their ids
    "group_bias": SAME, "local_tokens_per_group": SAME,
    # scalars of the budgeted / soft rules (not per expert)
    "locality_bias": SAME, "local_locality_counts": SAME, "schedule_iteration": SAME,
    **{f"tracker.{name}": kind for name, kind in TRACKER_STATE.items()},
}

_SINGLETON_EXPERT = re.compile(r"^(?P<head>experts\.experts\.)(?P<id>\d+)\.(?P<tail>.+)$")


# ------------------------------------------------------------------------------------------
# Orders
# ------------------------------------------------------------------------------------------
def check_order(order, num_experts: int) -> torch.Tensor:
    """int64 [E] on CPU; one-line ValueError unless ``order`` is a permutation of range(E)."""
    order_E = torch.as_tensor(order, dtype=torch.int64).reshape(-1).cpu()
    if order_E.numel() != num_experts or not torch.equal(order_E.sort().values,
                                                         torch.arange(num_experts)):
        raise ValueError(
            f"order={order_E.tolist()[:16]}... is not a permutation of 0..{num_experts - 1}: "
            "use the plan's groups concatenated"
        )
    return order_E


def inverse_order(order_E: torch.Tensor) -> torch.Tensor:
    """int64 [E]: inverse[order[i]] = i (old id -> new id), on ``order_E``'s device."""
    inverse_E = torch.empty_like(order_E)
    inverse_E[order_E] = torch.arange(order_E.numel(), device=order_E.device)
    return inverse_E


def order_from_groups(groups: Sequence[Sequence[int]]) -> list[int]:
    """The relabelling a plan means: its groups concatenated (new expert i = old order[i]), so
    group g becomes EP rank g's contiguous block of E/P experts."""
    return [int(e) for group in groups for e in group]


# ------------------------------------------------------------------------------------------
# Kinds on tensors
# ------------------------------------------------------------------------------------------
def is_contiguous_blocks(expert_to_group_E: torch.Tensor) -> bool:
    """True if the group map is the default G contiguous blocks arange(E) // (E/G), with
    G = max + 1 (one host sync; relabelling is off the hot path)."""
    num_experts = expert_to_group_E.numel()
    num_groups = int(expert_to_group_E.max()) + 1 if num_experts else 1
    if num_groups < 1 or num_experts % num_groups:
        return False
    experts_E = torch.arange(num_experts, device=expert_to_group_E.device)
    blocks_E = experts_E // (num_experts // num_groups)
    return bool(torch.equal(expert_to_group_E.to(torch.int64), blocks_E))


def permute_groups(expert_to_group_E: torch.Tensor, order_E: torch.Tensor) -> torch.Tensor:
    """The one group-map rule. The contiguous blocks are positional: they ARE the EP ranks'
    expert sets, and moving a plan's groups into them is what relabelling is for, so they stay.
    Any other map names a partition by expert id, which must follow its experts (ROWS) for the
    layer to compute the same function.

    Why decide from the tensor alone: an offline checkpoint carries no config, so a rule based on
    "was a map configured?" (the router's old rule) cannot be applied there; deciding by value
    gives the live router, ``convert`` and in-run replanning the same answer. A configured map
    equal to the blocks is indistinguishable from the default and is treated as it."""
    if is_contiguous_blocks(expert_to_group_E):
        return expert_to_group_E.clone()
    return expert_to_group_E.index_select(0, order_E.to(expert_to_group_E.device))


def permute(kind: str, t: torch.Tensor, order_E: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``t`` (expert axis first) relabelled as ``kind`` says (module docstring)."""
    if kind == SAME:
        return t.clone()
    order_E = order_E.to(t.device)
    if kind == ROWS:
        return t.index_select(0, order_E)
    if kind == PAIRS:
        return t.index_select(0, order_E).index_select(1, order_E)
    if kind == LISTS:
        return inverse_order(order_E)[t.index_select(0, order_E)]
    if kind == GROUPS:
        return permute_groups(t, order_E)
    raise ValueError(f"unknown permutation kind {kind!r}: expected one of rows, pairs, lists, "
                     "groups, same")


def permute_stacked(kind: str, t: torch.Tensor, orders: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t`` [layers, E, ...] with one order per layer (a checkpoint's leading layer axis)."""
    if t.shape[0] != len(orders):
        raise ValueError(f"tensor has {t.shape[0]} layers but {len(orders)} orders were given")
    return torch.stack([permute(kind, t[layer], order) for layer, order in enumerate(orders)])


# ------------------------------------------------------------------------------------------
# Live modules (router, tracker) and their optimizer state
# ------------------------------------------------------------------------------------------
def companions(p: torch.nn.Parameter, optimizer=None) -> dict[str, torch.Tensor]:
    """Every tensor that follows parameter ``p``: data, grad, main_grad (Megatron's DDP) and the
    optimizer's state tensors of ``p``'s shape (torch.optim: state keyed by parameter)."""
    out = {"data": p.data}
    if p.grad is not None:
        out["grad"] = p.grad
    if getattr(p, "main_grad", None) is not None:
        out["main_grad"] = p.main_grad
    if optimizer is not None:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape:
                out[f"state.{key}"] = value
    return out


@torch.no_grad()
def permute_module_state_(module: torch.nn.Module, order_E: torch.Tensor,
                          table: dict[str, str], optimizer=None) -> None:
    """In place: every parameter and buffer of ``module`` (dotted names, submodules included)
    takes its kind from ``table``; parameters' companions follow. Refuses, before changing
    anything, a module holding state the table does not name (it might be per-expert)."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    unknown = sorted(set(named) - set(table))
    if unknown:
        raise ValueError(
            f"{type(module).__name__} holds {unknown}, which expert relabelling does not know: "
            "add it to megatron_c2r.placement.permutation (ROUTER_STATE / TRACKER_STATE)"
        )
    for name, t in named.items():
        kind = table[name]
        if kind == SAME:
            continue
        targets = companions(t, optimizer) if isinstance(t, torch.nn.Parameter) else {"": t}
        for target in targets.values():
            target.copy_(permute(kind, target, order_E))


# ------------------------------------------------------------------------------------------
# Live expert weights
# ------------------------------------------------------------------------------------------
# One expert's tensors: a list of (parameter, chunk index, number of chunks). The expert's part
# of a tensor t shaped like the parameter is t.view(num_chunks, -1)[chunk index].
ExpertSlot = list[tuple[torch.nn.Parameter, int, int]]

_TE_EXPERT_PARAM = re.compile(r"^(.*\.)?(weight|bias)(\d+)$")


def local_expert_slots(experts: torch.nn.Module) -> list[ExpertSlot]:
    """The tensors of each local expert of a Megatron experts module, in local-expert order.
        SequentialMLP   one module per expert (``local_experts[j]``)
        GroupedMLP      weight1 / weight2 hold all local experts: expert j is chunk j of
                        ``weight.view(num_local_experts, -1)``, as its forward views them
        TEGroupedMLP    ``weight{j}`` / ``bias{j}`` per expert
    """
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [[(p, 0, 1) for _, p in expert.named_parameters()]
                for expert in experts.local_experts]
    num_local = getattr(experts, "num_local_experts", None)
    if num_local is None:
        raise ValueError(f"{type(experts).__name__} is not a Megatron experts module "
                         "(SequentialMLP, GroupedMLP, TEGroupedMLP)")
    if hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # GroupedMLP
        return [[(experts.weight1, j, num_local), (experts.weight2, j, num_local)]
                for j in range(num_local)]
    slots: list[ExpertSlot] = [[] for _ in range(num_local)]  # TEGroupedMLP
    for name, p in experts.named_parameters():
        match = _TE_EXPERT_PARAM.match(name)
        if match is None:
            raise ValueError(f"{type(experts).__name__}.{name} is not a per-expert tensor: "
                             "cannot relabel this experts module")
        slots[int(match.group(3))].append((p, 0, 1))
    if any(len(s) != len(slots[0]) or not s for s in slots):
        raise ValueError(f"{type(experts).__name__}: experts have different tensors")
    return slots


def slot_tensors(slot: ExpertSlot, optimizer=None) -> dict[str, torch.Tensor]:
    """name -> flat view of this expert's part of every tensor that follows its parameters.
    Names are ``"{role}.{companion}"``; every expert of a module has the same names."""
    out = {}
    for role, (p, idx, num) in enumerate(slot):
        for kind, t in companions(p, optimizer).items():
            out[f"{role}.{kind}"] = t.view(num, -1)[idx]
    return out


@torch.no_grad()
def permute_slots_(slots: Sequence[ExpertSlot], order_E: torch.Tensor, optimizer=None) -> None:
    """In place: slot i takes the tensors slot ``order[i]`` had (ROWS over local experts)."""
    views = [slot_tensors(s, optimizer) for s in slots]
    names = set(views[0])
    if any(set(v) != names for v in views):
        raise ValueError("experts carry different tensors (e.g. optimizer state on some only): "
                         "step the optimizer once on all experts or relabel without it")
    for name in names:
        stacked = torch.stack([views[int(old)][name] for old in order_E.tolist()])  # copies
        for i, v in enumerate(views):
            v[name].copy_(stacked[i])


# ------------------------------------------------------------------------------------------
# Checkpoint keys (torch_dist): ``rest`` is a key's part after its MoE prefix
# ------------------------------------------------------------------------------------------
def checkpoint_rule(rest: str, key: str) -> str:
    """The kind of the checkpoint tensor ``key`` = ...<MoE prefix><rest>:
        router.<state>                ROUTER_STATE[<state>] (unknown router state: ValueError)
        experts.experts.<id>.<name>   RENAME (singleton_local_shards: new key i = old key
                                      order[i])
        experts.experts.<name>        ROWS on the expert axis (SequentialMLP, GroupedMLP and
                                      TEGroupedMLP share this sharded layout)
        anything else                 SAME (shared experts, layer norms, ...)"""
    if rest.startswith("router."):
        kind = ROUTER_STATE.get(rest[len("router."):])
        if kind is None:
            raise ValueError(f"checkpoint key {key!r}: unknown router state, cannot relabel it "
                             "safely (extend megatron_c2r.placement.permutation.ROUTER_STATE)")
        return kind
    if _SINGLETON_EXPERT.match(rest):
        return RENAME
    if rest.startswith("experts.experts."):
        return ROWS
    return SAME


def singleton_expert_key(rest: str) -> Optional[tuple[str, int, str]]:
    """("experts.experts.", id, tail) for a per-expert key part, else None."""
    match = _SINGLETON_EXPERT.match(rest)
    return None if match is None else (match["head"], int(match["id"]), match["tail"])


def renamed_expert_key(rest: str, order_E: torch.Tensor) -> str:
    """The key part whose tensor new per-expert key ``rest`` takes: old id ``order[new id]``."""
    head, new_id, tail = singleton_expert_key(rest)
    return f"{head}{int(order_E[new_id])}.{tail}"


def moved_expert_offset(offset: Sequence[int], inverse_E: torch.Tensor) -> tuple[int, ...]:
    """A per-expert object's global offset (last entry = old expert id) after relabelling: the
    object of old expert j becomes new expert inverse[j]'s."""
    return tuple(offset[:-1]) + (int(inverse_E[offset[-1]]),)
