"""Load top-T collaborator lists from a file into a model's C2R routers.

Sources (read safely through ``megatron_c2r.files``: bounded, nothing unpickled):
    plan.json      ``megatron-c2r plan --top-t T`` output; per layer ``top_t_lists``. Pass
                   ``relabelled=True`` when the model's experts were relabelled with the same plan
                   (``megatron-c2r convert`` / in-run replanning), so the lists are translated to
                   the new expert ids (rows moved and ids mapped: ``placement.permutation``'s
                   LISTS rule, via ``PlanLayer.top_t_lists_relabelled``).
    lists.pt/.npy  int tensor [layers, E, L] (one per MoE layer, in module order) or [E, L]
                   (the same lists for every layer)

Every list is validated (shape, range, no self, no duplicates, length) before any router
changes. Shape suffixes as in ``megatron_c2r/routing/__init__.py``: E experts, L the length of a
top-T list (the paper's T).
"""

from __future__ import annotations

import os
from typing import List

import torch

from megatron_c2r.files import load_npy, load_torch_file


def read_top_t_lists(path: str, *, relabelled: bool = False) -> List[torch.Tensor]:
    """[E, L] int64 tensors, one per layer in file order (a single one for an [E, L] array)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"top-T lists file {path!r} does not exist")
    if path.endswith(".json"):
        from megatron_c2r.placement.plan_file import read_plan  # only plans need the plan layer

        plan = read_plan(path)
        out = []
        for layer in plan.layers:
            lists = layer.top_t_lists_relabelled() if relabelled else layer.top_t_lists
            if lists is None:
                raise ValueError(
                    f"{path}: layer {layer.layer} has no top_t_lists: re-run `megatron-c2r plan` "
                    "with --top-t T"
                )
            out.append(torch.tensor(lists, dtype=torch.int64))
        return out
    if path.endswith(".pt"):
        array = load_torch_file(path, "top-T lists file")
    elif path.endswith(".npy"):
        array = torch.from_numpy(load_npy(path, "top-T lists file"))
    else:
        raise ValueError(f"top-T lists file {path!r}: expected .json (a plan), .pt or .npy")
    if not isinstance(array, torch.Tensor) or array.dim() not in (2, 3):
        shape = tuple(array.shape) if isinstance(array, torch.Tensor) else type(array).__name__
        raise ValueError(f"{path}: expected an int tensor [layers, E, L] or [E, L], got {shape}")
    if array.dtype.is_floating_point:
        raise ValueError(f"{path}: dtype {array.dtype}: top-T lists hold integer expert ids")
    return list(array.long()) if array.dim() == 3 else [array.long()]


def load_top_t_lists_(model, path: str, *, relabelled: bool = False) -> int:
    """Install lists from ``path`` into every C2R router of ``model`` (module order); returns
    the number of routers set. All lists are validated before the first router changes."""
    from megatron_c2r.moe.router import c2r_routers
    from megatron_c2r.routing.functional import validate_top_t_lists

    routers = list(c2r_routers(model))
    lists = read_top_t_lists(path, relabelled=relabelled)
    if len(lists) == 1 and len(routers) > 1:
        lists = lists * len(routers)
    if len(lists) != len(routers):
        raise ValueError(
            f"{path} holds lists for {len(lists)} MoE layers but the model has {len(routers)} "
            "C2R routers: use the file planned for this model"
        )
    for router, lists_EL in zip(routers, lists):
        validate_top_t_lists(lists_EL, router.config.num_moe_experts, router.topk)
    for router, lists_EL in zip(routers, lists):
        router.set_top_t_lists(lists_EL)
    return len(routers)
