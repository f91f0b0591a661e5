"""C2R metrics reduced once per logged iteration (issue 16 part 3), on 4 real gloo processes
laid out by Megatron's parallel state as 2 pipeline stages x 2 data-parallel ranks. The
busiest-over-mean loads (issue 15 part 5) ride the same collective and equal a brute-force count
over every rank's routing maps.

The oracle is Megatron's own tracker: the penalty goes into ``save_to_aux_losses_tracker`` per
layer and micro-batch, exactly as the router logs ``c2r_penalty``, and
``reduce_aux_losses_tracker_across_ranks`` reduces it across pipeline stages and DP ranks. (It is
given the DP group as its reduce group with ``reduce_group_has_dp=True``, its SUM path: gloo has
no ReduceOp.AVG, so the average over DP is divided out here; with TP = CP = 1 that is what its
default tp_cp SUM + DP AVG computes.)
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

NUM_LAYERS, MICRO_BATCHES, EP = 4, 3, 4


def _reduce_two_stages_two_dp_ranks():
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils

    from megatron_c2r.metrics.report import C2RMetrics
    from megatron_c2r.metrics.stats import routing_loads
    from tests.sync_audit import SyncAudit
    from tests.unit.test_metrics import random_map

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, create_gloo_process_groups=False)
    try:
        rank, stage = dist.get_rank(), ps.get_pipeline_model_parallel_rank()
        dp_group, dp_size = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
        layers = [2 * stage, 2 * stage + 1]  # this stage's global layer indices
        metrics = C2RMetrics(num_layers=NUM_LAYERS, ep_size=EP)
        moe_utils.clear_aux_losses_tracker()
        maps = {layer: [] for layer in layers}
        for mb in range(MICRO_BATCHES):
            for layer in layers:
                rmap = random_map(9 + rank, 16, 4, seed=100 * rank + 10 * layer + mb, skew=layer / 2)
                maps[layer].append(rmap)
                metrics.add_loads(layer, routing_loads(rmap, ep_size=EP, ranks_per_node=2))
                penalty = torch.tensor(0.1 * (rank + 1) + 0.01 * layer + 0.001 * mb)
                metrics.add(layer, {"penalty": penalty, "dispatched_rows_per_token": 1.0 + rank})
                moe_utils.save_to_aux_losses_tracker(
                    "c2r_penalty", penalty, layer + 1, NUM_LAYERS,
                    reduce_group=dp_group, reduce_group_has_dp=True,
                )  # fmt: skip
        audit = SyncAudit().track(*[v for s in metrics._sums.values() for v in s.values()
                                    if isinstance(v, torch.Tensor)])  # fmt: skip
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce, audit:
            values = metrics.compute(group=dist.group.WORLD)
        moe_utils.reduce_aux_losses_tracker_across_ranks(["c2r_penalty"])
        tracked = moe_utils.get_moe_layer_wise_logging_tracker()["c2r_penalty"]["values"]
        megatron = (tracked / (MICRO_BATCHES * dp_size)).tolist()
        moe_utils.clear_aux_losses_tracker()
        return dict(
            values=values,
            megatron=megatron,
            all_reduces=all_reduce.call_count,
            syncs=[op for _, op in audit.events],
            stage=stage,
            maps=maps,
        )
    finally:
        ps.destroy_model_parallel()


@pytest.mark.world_size(4)
def test_one_collective_reduces_every_layer_like_megatrons_tracker_across_dp_and_pp(dist_pool):
    results = dist_pool(4).run(_reduce_two_stages_two_dp_ranks)
    assert sorted(r["stage"] for r in results) == [0, 0, 1, 1]
    for rank, r in enumerate(results):
        assert r["all_reduces"] == 1, f"rank {rank}: {r['all_reduces']} collectives"
        assert r["syncs"] == ["Tensor.cpu"], f"rank {rank}: {r['syncs']}"
        values = r["values"]
        assert values == results[0]["values"]  # every rank reports the same numbers
        for layer, want in enumerate(r["megatron"]):
            assert values[f"moe/c2r/penalty_layer_{layer}"] == pytest.approx(want, rel=1e-6)
        # The layer mean is Megatron's logged value: sum over layers / number of MoE layers.
        assert values["moe/c2r/penalty"] == pytest.approx(sum(r["megatron"]) / NUM_LAYERS, rel=1e-6)
    # A host float metric is averaged over the DP ranks that hold the layer: ranks 0, 1 hold
    # stage 0 (layers 0-1) and ranks 2, 3 stage 1 (Megatron's rank order with TP = 1).
    values = results[0]["values"]
    stage_ranks = {s: [i for i, r in enumerate(results) if r["stage"] == s] for s in (0, 1)}
    for stage, ranks in stage_ranks.items():
        want = sum(1.0 + i for i in ranks) / len(ranks)
        for layer in (2 * stage, 2 * stage + 1):
            assert values[f"moe/c2r/dispatched_rows_per_token_layer_{layer}"] == pytest.approx(want)


@pytest.mark.world_size(4)
def test_busiest_rank_and_node_loads_equal_a_brute_force_count_over_every_source(dist_pool):
    from megatron_c2r.metrics.report import LOAD_NAMES
    from tests.unit.test_metrics import brute_loads

    results = dist_pool(4).run(_reduce_two_stages_two_dp_ranks)
    values = results[0]["values"]
    for layer in range(NUM_LAYERS):
        maps = [m for r in results for m in r["maps"].get(layer, [])]
        assert len(maps) == 2 * MICRO_BATCHES  # the two DP ranks of the layer's stage
        want = brute_loads(maps, ep_size=EP, ranks_per_node=2)
        for name in LOAD_NAMES:
            got = values[f"moe/c2r/{name}_layer_{layer}"]
            assert got == pytest.approx(want[name], rel=1e-12), (layer, name)
    assert values["moe/c2r/busiest_rank_tokens_over_mean_layer_3"] > 1.2  # skewed routing shows
