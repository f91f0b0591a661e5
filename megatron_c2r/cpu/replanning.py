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


def plan_and_relabel_model(model, optimizer, *, seed: int) -> Dict[str, List]:
    """Returns {"orders": per-layer relabelling (new expert i = old order[i]),
    "predicted_ranks_per_token": per-layer {identity, random, planned}}."""
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
    plans = replan_(model, optimizer, top_k=routers[0].topk, ep_size=num_groups, seed=seed)
    return {"orders": [p.order for p in plans],
            "predicted_ranks_per_token": [p.predicted_ranks_per_token for p in plans]}
