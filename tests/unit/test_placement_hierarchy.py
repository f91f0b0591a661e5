"""Hierarchical placement (issue 14 part 4): experts into nodes first (fewest nodes per token),
then into ranks inside each node; exact against brute force for small E, the heuristic within 2%
of it, fewer nodes per token than a flat plan, both load levels bounded, one plan file, and the
existing relabelling paths (`convert` offline, `relabel_in_run_` in a gloo run) apply it."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from benchmarks.placement_balance import skewed_top_indices
from megatron_c2r.cli import main
from megatron_c2r.placement import partition
from megatron_c2r.placement.plan_file import read_plan
from megatron_c2r.placement.planner import (
    PlannerConfig,
    expert_load_E,
    plan_layer,
    predicted_ranks_per_token,
)
from megatron_c2r.placement.sources import LayerCollab, synthetic_top_indices

EPS = 1e-9


def _layers(top, num_experts):
    trace = LayerCollab.from_top_indices(top, num_experts)
    return {"trace": trace, "matrix": LayerCollab.from_counts(trace.counts_EE, trace.top_k)}


def _nodes(plan, per_node):
    return np.asarray(plan.expert_to_rank) // per_node


def _labelled_placements(num_experts, ep_size):
    """Every assignment of experts to ranks with E/P each (labelled ranks), by brute force."""
    size = num_experts // ep_size
    out = set()
    for perm in itertools.permutations(range(num_experts)):
        e2r = [0] * num_experts
        for pos, e in enumerate(perm):
            e2r[e] = pos // size
        out.add(tuple(e2r))
    return np.array(sorted(out))


def _exact_ranks_per_token(top, e2r):
    return sum(len({e2r[e] for e in row}) for row in top.tolist()) / len(top)


@pytest.mark.parametrize("bound", [None, 1.1, 1.25])
def test_the_exact_hierarchical_plan_equals_brute_force_nodes_first_then_ranks(bound):
    top = skewed_top_indices(8, 3, 600, 2, 1.5, 1.0, seed=0)
    layer = LayerCollab.from_top_indices(top, 8)
    load = expert_load_E(layer)
    placements = _labelled_placements(8, 4)  # 2520; node = rank // 2
    rank_busy = partition.busiest_over_mean(load, placements, 4)
    node_busy = partition.busiest_over_mean(load, placements // 2, 2)
    x = np.inf if bound is None else bound
    excess = (np.maximum(rank_busy - max(x, rank_busy.min()), 0)
              + np.maximum(node_busy - max(x, node_busy.min()), 0))
    nodes = np.array([_exact_ranks_per_token(top, (p // 2).tolist()) for p in placements])
    ranks = np.array([_exact_ranks_per_token(top, p.tolist()) for p in placements])
    least = excess <= excess.min() + 1e-9
    best_nodes = nodes[least].min()
    best_ranks = ranks[least & (nodes <= best_nodes + 1e-12)].min()

    plan = plan_layer(layer, PlannerConfig(ep_size=4, num_nodes=2, max_load_imbalance=bound))
    assert plan.predicted_nodes_per_token["planned"] == pytest.approx(best_nodes, rel=1e-12)
    assert plan.predicted_ranks_per_token["planned"] == pytest.approx(best_ranks, rel=1e-12)
    assert _exact_ranks_per_token(top, _nodes(plan, 2).tolist()) == pytest.approx(best_nodes)
    if bound is not None:
        assert plan.load_bound["smallest_rank"] == pytest.approx(rank_busy.min(), rel=1e-12)
        assert plan.load_bound["smallest_node"] == pytest.approx(node_busy.min(), rel=1e-12)


@pytest.mark.parametrize("source", ["trace", "matrix"])
@pytest.mark.parametrize("shape", [(12, 3, 4, 2), (12, 4, 6, 3)], ids=["2x2", "3x2"])
def test_the_heuristic_hierarchical_plan_is_within_2_percent_of_the_exact_one(source, shape):
    num_experts, top_k, ep_size, num_nodes = shape
    layer = _layers(skewed_top_indices(num_experts, top_k, 3000, 4, 2.0, 1.0, seed=1),
                    num_experts)[source]
    for bound in (None, 1.1, 1.25):
        config = PlannerConfig(ep_size=ep_size, num_nodes=num_nodes, max_load_imbalance=bound)
        exact = plan_layer(layer, config)
        heur = plan_layer(layer, PlannerConfig(ep_size=ep_size, num_nodes=num_nodes,
                                               max_load_imbalance=bound, exact_max_experts=0))
        assert heur.predicted_nodes_per_token["planned"] <= \
            exact.predicted_nodes_per_token["planned"] * 1.02, bound
        if bound is not None:
            for level in ("rank", "node"):
                cap = max(bound, exact.load_bound[f"smallest_{level}"])
                got = getattr(heur, f"predicted_busiest_{level}_load")["planned"]
                assert got <= cap + EPS, (bound, level, got, cap)


@pytest.mark.parametrize("shape", [(64, 8, 8, 2, 2), (256, 8, 64, 8, 16)], ids=["2x4", "8x8"])
def test_nodes_first_reaches_fewer_nodes_per_token_than_a_flat_plan(shape):
    num_experts, top_k, ep_size, num_nodes, clusters = shape
    per_node = ep_size // num_nodes
    top = synthetic_top_indices(num_experts, top_k, 12000, clusters, 2.0, seed=2)
    layer = LayerCollab.from_top_indices(top, num_experts)
    flat = plan_layer(layer, PlannerConfig(ep_size=ep_size))
    hier = plan_layer(layer, PlannerConfig(ep_size=ep_size, num_nodes=num_nodes))
    flat_nodes = predicted_ranks_per_token(layer, _nodes(flat, per_node))
    got = hier.predicted_nodes_per_token
    assert got["planned"] < 0.97 * flat_nodes, (got, flat_nodes)
    assert got["planned"] < 0.8 * min(got["identity"], got["random"])
    # inside the nodes, ranks are still planned: fewer ranks than the identity
    pred = hier.predicted_ranks_per_token
    assert pred["planned"] < pred["identity"]


def test_the_rank_level_keeps_the_node_split_and_the_degenerate_cases_are_flat_plans():
    top = synthetic_top_indices(64, 8, 8000, 8, 1.5, seed=3)
    layer = LayerCollab.from_top_indices(top, 64)
    hier = plan_layer(layer, PlannerConfig(ep_size=8, num_nodes=2))
    nodes_only = plan_layer(layer, PlannerConfig(ep_size=2))
    members = [sorted(np.flatnonzero(_nodes(hier, 4) == n).tolist()) for n in range(2)]
    assert members == nodes_only.groups  # same node split, same node order
    flat = plan_layer(layer, PlannerConfig(ep_size=8))
    assert plan_layer(layer, PlannerConfig(ep_size=8, num_nodes=8)).groups == flat.groups
    assert plan_layer(layer, PlannerConfig(ep_size=8, num_nodes=1)) == flat


@pytest.mark.parametrize("source", ["trace", "matrix"])
def test_hierarchical_plans_bound_rank_and_node_loads_where_achievable(source):
    top = skewed_top_indices(64, 8, 8000, 8, 2.0, 1.0, seed=4)
    layer = _layers(top, 64)[source]
    unbounded = plan_layer(layer, PlannerConfig(ep_size=8, num_nodes=2))
    assert unbounded.predicted_busiest_rank_load["planned"] > 1.5
    for bound in (1.05, 1.1, 1.25):
        plan = plan_layer(layer, PlannerConfig(ep_size=8, num_nodes=2, max_load_imbalance=bound))
        for level in ("rank", "node"):
            smallest = plan.load_bound[f"smallest_{level}"]
            assert 1.0 - EPS <= smallest <= 1.02
            busiest = getattr(plan, f"predicted_busiest_{level}_load")["planned"]
            assert busiest <= max(bound, smallest) + EPS, (level, bound, busiest)
        assert plan.predicted_nodes_per_token["planned"] <= \
            plan.predicted_nodes_per_token["identity"] + EPS


def test_a_rank_bound_the_node_split_cannot_meet_is_met_bottom_up():
    # Hot experts (one popular cluster) concentrated in one node cannot be spread over its
    # ranks: top-down alone misses the rank bound that a flat plan grouped into nodes meets.
    top = skewed_top_indices(128, 8, 12000, 8, 2.0, 1.2, seed=5)
    layer = LayerCollab.from_top_indices(top, 128)
    plan = plan_layer(layer, PlannerConfig(ep_size=32, num_nodes=4, max_load_imbalance=1.1))
    cap_rank = max(1.1, plan.load_bound["smallest_rank"])
    assert plan.predicted_busiest_rank_load["planned"] <= cap_rank + EPS
    assert plan.predicted_busiest_node_load["planned"] <= max(
        1.1, plan.load_bound["smallest_node"]) + EPS
    flat = plan_layer(layer, PlannerConfig(ep_size=32, max_load_imbalance=1.1))
    assert plan.load_bound["smallest_rank"] <= flat.load_bound["smallest_rank"] + EPS


def test_the_plan_command_writes_one_hierarchical_plan_with_nodes_per_token(tmp_path, capsys):
    tops = [synthetic_top_indices(32, 4, 2000, 4, 2.0, seed=s) for s in range(2)]
    torch.save({"top_indices": torch.tensor(np.stack(tops))}, tmp_path / "dump.pt")
    outs = []
    for flag in (["--nodes", "2"], ["--gpus-per-node", "4"]):
        out = tmp_path / f"plan{flag[0]}.json"
        rc = main(["plan", "--collab", str(tmp_path / "dump.pt"), "--ep", "8", *flag,
                   "--max-load-imbalance", "1.1", "--tradeoff", "1.25", "--out", str(out),
                   "--no-progress"])
        assert rc == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    report = capsys.readouterr().out
    assert "nodes per token" in report and "busiest node / mean" in report
    plan = read_plan(str(tmp_path / "plan--nodes.json"))
    assert plan.num_nodes == 2 and plan.ep_size == 8
    for layer, top in zip(plan.layers, tops):
        e2n = [r // 4 for r in layer.expert_to_rank]
        assert layer.predicted_nodes_per_token["planned"] == pytest.approx(
            _exact_ranks_per_token(top, e2n), rel=1e-12)
        assert set(layer.load_bound) == {"max_load_imbalance", "smallest_exact", "smallest_rank",
                                         "smallest_node"}


# ------------------------------------------------------------------------------------------
# The existing relabelling paths take a hierarchical plan as they take any plan (its order).
# ------------------------------------------------------------------------------------------
def _hierarchical_plan(num_experts=8, layers=2):
    from megatron_c2r.placement.planner import make_plan

    tops = [synthetic_top_indices(num_experts, 2, 800, 2, 2.0, seed=10 + s) for s in range(layers)]
    collab = [LayerCollab.from_top_indices(t, num_experts) for t in tops]
    return make_plan(collab, PlannerConfig(ep_size=4, num_nodes=2, max_load_imbalance=1.25),
                     progress=False)


def _convert_with_a_hierarchical_plan(tmp):
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_c2r import compat
    from megatron_c2r.placement.plan_file import write_plan
    from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

    def model(seed):
        init_parallel(ep=1)
        cfg = moe_config(num_layers=2, hidden_size=32, num_moe_experts=8)
        torch.manual_seed(seed)
        m = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=8, moe_grouped_gemm=False), vocab_size=64, max_sequence_length=16)
        g = torch.Generator().manual_seed(seed)
        for layer in m.decoder.layers:
            for p in layer.mlp.experts.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.5
        return m

    x = torch.randn(10, 2, 32, generator=torch.Generator().manual_seed(99))
    plan = _hierarchical_plan()
    with megatron_cpu():
        src = model(seed=1)
        want = [layer.mlp(x)[0].detach() for layer in src.decoder.layers]
        root, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        os.makedirs(os.path.join(root, "iter_0000003"))
        sharded = src.sharded_state_dict()
        sharded["iteration"] = 3
        compat.save_dist_checkpoint(sharded, os.path.join(root, "iter_0000003"))
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")
        write_plan(plan, os.path.join(tmp, "plan.json"))
        rc = main(["convert", "--load", root, "--plan", os.path.join(tmp, "plan.json"),
                   "--save", out])
        fresh = model(seed=2)
        state = dist_checkpointing.load(fresh.sharded_state_dict(),
                                        os.path.join(out, "iter_0000003"))
        state.pop("iteration")
        fresh.load_state_dict(state)
        got = [layer.mlp(x)[0].detach() for layer in fresh.decoder.layers]
        routers = [bool(torch.equal(b.mlp.router.weight, a.mlp.router.weight[layer.order]))
                   for a, b, layer in zip(src.decoder.layers, fresh.decoder.layers, plan.layers)]
    return dict(rc=rc, err=max(float((g - w).abs().max()) for g, w in zip(got, want)),
                scale=max(float(w.abs().max()) for w in want), routers=routers,
                moved=[layer.order != list(range(8)) for layer in plan.layers])


def test_convert_applies_a_hierarchical_plan_to_a_checkpoint(dist_pool, tmp_path):
    (r,) = dist_pool(1).run(_convert_with_a_hierarchical_plan, str(tmp_path))
    assert r["rc"] == 0 and any(r["moved"])
    assert r["err"] <= 1e-6 * max(1.0, r["scale"])
    assert all(r["routers"])


@pytest.mark.world_size(2)
def test_in_run_relabelling_applies_a_hierarchical_plan_across_ep_ranks(dist_pool):
    from tests.distributed.test_replan import _replan_matches_the_unreplanned_twin

    order = _hierarchical_plan(layers=1).layers[0].order
    assert order != list(range(8))
    for r in dist_pool(2).run(_replan_matches_the_unreplanned_twin, order, {}):
        assert r["after"] == pytest.approx(r["before"], rel=1e-6, abs=1e-9)
        assert r["final_err"] <= 1e-6 * max(1.0, r["final"])
        assert max(r["moved"].values()) <= 1e-7
