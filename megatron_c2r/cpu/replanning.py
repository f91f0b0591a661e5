"""End-of-warm-up placement for the CPU main job: trackers -> planner -> in-run relabelling.

Runs on every rank at the same iteration (collective): each C2R router's co-activation counts
are summed over the ranks, the planner picks a balanced placement per layer (planned on rank 0,
broadcast), and the model is relabelled in place so each planned group becomes one EP rank's
contiguous block; expert weights and their AdamW state move between ranks with one all-to-all
per layer (``megatron_c2r.placement.replan``). The routers' groups are the contiguous blocks, so
after this the group constraint keeps co-activating experts together.
"""

from __future__ import annotations

from typing import Dict, List


def plan_and_relabel_model(model, optimizer, *, seed: int, plan_nodes: bool = False) -> Dict[str, List]:
    """Returns {"orders": per-layer relabelling (new expert i = old order[i]),
    "predicted_ranks_per_token": per-layer {identity, random, planned}}. ``plan_nodes``
    (``cpu.replan_nodes``): plan the routers' ``c2r.num_nodes`` nodes first, then the groups
    inside each node (the hierarchical planner); otherwise one flat partition into groups."""
    from megatron.core import parallel_state as ps

    from megatron_c2r.moe.router import c2r_routers
    from megatron_c2r.placement.replan import replan_

    routers = list(c2r_routers(model))
    if not routers:
        raise ValueError("cpu.replan=true needs C2R routers: set c2r.enabled=true")
    for router in routers:
        router.tracker.reduce_()
    # Plan for the routers' groups (= the EP ranks by default; more, "virtual", groups when
    # c2r.num_groups is set, e.g. to study EP=8 routing on fewer processes).
    num_groups = routers[0].c2r_config.num_groups
    if num_groups % ps.get_expert_model_parallel_world_size():
        raise ValueError(
            f"c2r.num_groups={num_groups} must be a multiple of expert-model-parallel-size="
            f"{ps.get_expert_model_parallel_world_size()} so each rank holds whole groups"
        )
    num_nodes = routers[0].c2r_config.num_nodes if plan_nodes else 1
    if num_nodes is None:
        raise ValueError("cpu.replan_nodes=true plans nodes first, but c2r.num_nodes is not set: "
                         "set c2r.num_nodes (or c2r.mode: node) or cpu.replan_nodes: false")
    plans = replan_(model, optimizer, top_k=routers[0].topk, ep_size=num_groups, seed=seed,
                    num_nodes=num_nodes)
    return {"orders": [p.order for p in plans],
            "predicted_ranks_per_token": [p.predicted_ranks_per_token for p in plans]}
