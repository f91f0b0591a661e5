"""Token-balanced placement (issue 15 part 1): expert loads against a Python count, the bounded
exact solver against brute force, the heuristic within 2% of brute force under the bound, the
bound held wherever achievable and the smallest achievable recorded where not, never worse than
the identity, no bound = the locality-only planner's plans, and the `plan` command's bound,
trade-off report and one-line errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from benchmarks.placement_balance import skewed_top_indices
from megatron_c2r.cli import main
from megatron_c2r.placement import partition
from megatron_c2r.placement.exhaustive import balanced_partitions
from megatron_c2r.placement.plan_file import plan_from_json, read_plan
from megatron_c2r.placement.planner import (
    PlannerConfig,
    expert_load_E,
    identity_placement,
    plan_layer,
    predicted_ranks_per_token,
    within_group_pairs,
)
from megatron_c2r.placement.sources import LayerCollab, synthetic_top_indices

EPS = 1e-9


def _layers(top, num_experts):
    trace = LayerCollab.from_top_indices(top, num_experts)
    return {"trace": trace, "matrix": LayerCollab.from_counts(trace.counts_EE, trace.top_k)}


def _busiest(load, e2r, ep_size):
    loads = [sum(load[e] for e in range(len(e2r)) if e2r[e] == g) for g in range(ep_size)]
    return max(loads) / (sum(load) / ep_size)


def _locality(layer, e2r):
    """Lower is better, the objective the planner optimises: exact distinct ranks per token on
    traces, minus within-group pairs on matrices."""
    e2r = np.asarray(e2r)
    if layer.sets_UK is not None:
        return predicted_ranks_per_token(layer, e2r)
    return -float(within_group_pairs(layer.counts_EE, e2r))


def _set_partitions(num_experts, ep_size):
    """Every balanced partition as e2r lists, from permutations (independent of the planner)."""
    size = num_experts // ep_size
    seen = set()
    for perm in itertools.permutations(range(num_experts)):
        seen.add(tuple(sorted(tuple(sorted(perm[g * size:(g + 1) * size]))
                              for g in range(ep_size))))
    out = []
    for groups in sorted(seen):
        e2r = [0] * num_experts
        for g, members in enumerate(groups):
            for e in members:
                e2r[e] = g
        out.append(e2r)
    return out


def _oracle(layer, partitions, ep_size, bound):
    """(best locality under max(bound, smallest), smallest busiest/mean) by brute force."""
    load = expert_load_E(layer).tolist()
    busy = [_busiest(load, e2r, ep_size) for e2r in partitions]
    smallest = min(busy)
    cap = max(bound, smallest) * (1 + EPS)
    return min(_locality(layer, e2r) for e2r, b in zip(partitions, busy) if b <= cap), smallest


# ------------------------------------------------------------------------------------------
def test_expert_loads_are_token_counts_on_traces_and_row_sums_over_k_minus_1_on_matrices():
    top = skewed_top_indices(16, 4, 700, 4, 1.5, 1.0, seed=0)
    want = np.bincount(top.ravel(), minlength=16).astype(float)
    layers = _layers(top, 16)
    np.testing.assert_array_equal(expert_load_E(layers["trace"]), want)
    np.testing.assert_allclose(expert_load_E(layers["matrix"]), want, rtol=1e-12)
    # top-1 matrices carry no loads: uniform, so no bound ever binds
    np.testing.assert_array_equal(expert_load_E(LayerCollab.from_counts(np.zeros((4, 4)), 1)),
                                  np.ones(4))


def test_group_loads_and_busiest_over_mean_match_a_python_sum():
    rng = np.random.default_rng(1)
    load = rng.random(12) * 10
    e2r_CE = np.stack([rng.permutation(identity_placement(12, 3)) for _ in range(5)])
    got = partition.busiest_over_mean(load, e2r_CE, 3)
    assert got == pytest.approx([_busiest(load.tolist(), e.tolist(), 3) for e in e2r_CE], rel=1e-12)


@pytest.mark.parametrize("source", ["trace", "matrix"])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_the_exact_planner_under_a_bound_equals_brute_force_over_every_partition(source, ep_size):
    layer = _layers(skewed_top_indices(8, 3, 900, 2, 1.5, 1.2, seed=ep_size), 8)[source]
    partitions = _set_partitions(8, ep_size)
    load = expert_load_E(layer).tolist()
    for bound in (1.0, 1.05, 1.1, 1.25, 2.0):
        plan = plan_layer(layer, PlannerConfig(ep_size=ep_size, max_load_imbalance=bound))
        best, smallest = _oracle(layer, partitions, ep_size, bound)
        assert _locality(layer, plan.expert_to_rank) == pytest.approx(best, rel=1e-9), bound
        assert _busiest(load, plan.expert_to_rank, ep_size) <= max(bound, smallest) + EPS
        assert plan.load_bound["smallest_rank"] == pytest.approx(smallest, rel=1e-12)
        assert plan.load_bound["smallest_exact"] is True
        assert plan.predicted_busiest_rank_load["planned"] == pytest.approx(
            _busiest(load, plan.expert_to_rank, ep_size), rel=1e-12)


@pytest.mark.parametrize("source", ["trace", "matrix"])
@pytest.mark.parametrize("shape", [(16, 4, 2, 4), (12, 3, 4, 4)], ids=["16e_2ranks", "12e_4ranks"])
def test_the_heuristic_under_a_bound_is_within_2_percent_of_brute_force(source, shape):
    num_experts, top_k, ep_size, clusters = shape
    top = skewed_top_indices(num_experts, top_k, 3000, clusters, 2.0, 1.0, seed=3)
    layer = _layers(top, num_experts)[source]
    partitions = np.stack(list(balanced_partitions(num_experts, ep_size)))
    load_E = expert_load_E(layer)
    busy_C = partition.busiest_over_mean(load_E, partitions, ep_size)
    vals_C = partition.objective_batch(layer, partitions)  # lower is better, as _locality
    for bound in (1.02, 1.05, 1.1, 1.25):
        config = PlannerConfig(ep_size=ep_size, max_load_imbalance=bound, exact_max_experts=0)
        plan = plan_layer(layer, config)
        cap = max(bound, busy_C.min())
        best = vals_C[busy_C <= cap * (1 + EPS)].min()
        got = _locality(layer, plan.expert_to_rank)
        assert got <= best + 0.02 * abs(best), (bound, got, best)
        assert partition.busiest_over_mean(load_E, np.asarray(plan.expert_to_rank), ep_size) \
            <= cap + EPS


def test_the_bound_holds_wherever_achievable_and_the_smallest_is_recorded_where_not():
    top = skewed_top_indices(64, 8, 8000, 8, 2.0, 1.0, seed=4)
    for source, layer in _layers(top, 64).items():
        load_E = expert_load_E(layer)
        # No group of 8 can hold less than the heaviest expert and the 7 lightest others.
        lower = (load_E.max() + np.sort(load_E)[:7].sum()) / (load_E.sum() / 8)
        for bound in (1.0, 1.02, 1.05, 1.1, 1.25):
            plan = plan_layer(layer, PlannerConfig(ep_size=8, max_load_imbalance=bound))
            smallest = plan.load_bound["smallest_rank"]
            assert max(1.0, lower) - EPS <= smallest <= 1.02, (source, smallest)
            busiest = plan.predicted_busiest_rank_load["planned"]
            assert busiest <= max(bound, smallest) + EPS, (source, bound, busiest)
            if bound > smallest:  # achievable: met, and locality still beats the identity
                assert plan.predicted_ranks_per_token["planned"] < \
                    plan.predicted_ranks_per_token["identity"]


def test_a_tighter_bound_costs_locality_and_a_loose_one_keeps_the_unbounded_plan():
    top = skewed_top_indices(64, 8, 8000, 8, 2.0, 1.0, seed=5)
    layer = _layers(top, 64)["trace"]
    off = plan_layer(layer, PlannerConfig(ep_size=8))
    assert off.predicted_busiest_rank_load["planned"] > 1.5  # the pile-up the bound prevents
    loose = plan_layer(layer, PlannerConfig(ep_size=8, max_load_imbalance=10.0))
    assert loose.groups == off.groups
    ranks = [plan_layer(layer, PlannerConfig(ep_size=8, max_load_imbalance=b))
             .predicted_ranks_per_token["planned"] for b in (1.5, 1.25, 1.1, 1.05)]
    assert off.predicted_ranks_per_token["planned"] < ranks[0]
    assert all(a <= b * 1.01 for a, b in zip(ranks, ranks[1:])), ranks  # heuristic: ~monotone


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_the_identity_on_either_axis_when_the_identity_meets_the_bound(seed):
    top = skewed_top_indices(32, 4, 3000, 8, 1.0, 0.5, seed=seed)
    for source, layer in _layers(top, 32).items():
        load_E = expert_load_E(layer)
        identity_busy = float(partition.busiest_over_mean(load_E, identity_placement(32, 4), 4))
        plan = plan_layer(layer, PlannerConfig(ep_size=4, max_load_imbalance=identity_busy))
        assert _locality(layer, plan.expert_to_rank) <= \
            _locality(layer, identity_placement(32, 4)) + EPS
        pred = plan.predicted_ranks_per_token
        assert pred["planned"] <= pred["identity"] + EPS
        assert plan.predicted_busiest_rank_load["planned"] <= identity_busy + EPS


def test_when_the_identity_breaks_the_bound_the_plan_beats_the_load_balanced_start():
    top = skewed_top_indices(64, 8, 8000, 8, 2.0, 1.0, seed=6)
    for source, layer in _layers(top, 64).items():
        load_E = expert_load_E(layer)
        identity_busy = float(partition.busiest_over_mean(load_E, identity_placement(64, 8), 8))
        plan = plan_layer(layer, PlannerConfig(ep_size=8, max_load_imbalance=1.05))
        assert identity_busy > 1.05 >= plan.predicted_busiest_rank_load["planned"] - EPS
        balanced = partition.balanced_by_load(load_E, 8)
        assert _locality(layer, plan.expert_to_rank) < _locality(layer, balanced)


def test_the_load_balanced_start_is_within_5_percent_of_the_smallest_busiest_group():
    rng = np.random.default_rng(7)
    for num_experts, ep_size in [(8, 2), (8, 4), (12, 3), (12, 4)]:
        partitions = np.stack(list(balanced_partitions(num_experts, ep_size)))
        for _ in range(5):
            load_E = rng.pareto(1.5, num_experts) + 0.1
            best = partition.busiest_over_mean(load_E, partitions, ep_size).min()
            got = partition.busiest_over_mean(load_E, partition.balanced_by_load(load_E, ep_size),
                                              ep_size)
            assert best - EPS <= got <= best * 1.05


def test_repair_reaches_the_caps_and_bounded_swaps_never_break_them():
    top = skewed_top_indices(64, 8, 8000, 8, 2.0, 1.0, seed=8)
    layer = _layers(top, 64)["matrix"]
    load_E = expert_load_E(layer)
    cap_P = np.full(8, 1.05 * load_E.sum() / 8)
    start = partition.refine_pairs(layer.counts_EE, identity_placement(64, 8), 8)  # piles up
    assert not partition.fits_caps(load_E, start, cap_P)
    limits = partition.Limits(start, 8, load_E=load_E, cap_P=cap_P)
    repaired = partition.repair_to_caps(layer.counts_EE, start, 8, limits)
    assert partition.fits_caps(load_E, repaired, cap_P)
    assert np.bincount(repaired, minlength=8).tolist() == [8] * 8
    limits = partition.Limits(repaired, 8, load_E=load_E, cap_P=cap_P)
    refined = partition.refine_pairs(layer.counts_EE, repaired, 8, limits=limits)
    assert partition.fits_caps(load_E, refined, cap_P)
    assert within_group_pairs(layer.counts_EE, refined) >= within_group_pairs(layer.counts_EE,
                                                                              repaired)
    np.testing.assert_allclose(limits.loads_P, partition.group_loads(load_E, refined, 8))


# Plans of the locality-only planner before the bound existed (commit 0a85412), as orders.
TODAYS_ORDERS = {
    (12, 3, 4, 4, 0.7, 5): [0, 2, 10, 1, 3, 7, 4, 6, 9, 5, 8, 11],
    (16, 4, 4, 4, 1.5, 0): [1, 2, 6, 15, 4, 5, 9, 13, 0, 3, 8, 10, 7, 11, 12, 14],
    (32, 4, 4, 8, 1.0, 1): [1, 4, 6, 12, 17, 19, 28, 30, 0, 5, 9, 15, 18, 20, 25, 27, 3, 7, 10,
                            13, 16, 21, 22, 23, 2, 8, 11, 14, 24, 26, 29, 31],
}


@pytest.mark.parametrize("source", ["trace", "matrix"])
@pytest.mark.parametrize("key", list(TODAYS_ORDERS), ids=lambda k: f"{k[0]}e")
def test_no_bound_reproduces_the_locality_only_planners_plans(source, key):
    num_experts, top_k, ep_size, clusters, strength, seed = key
    top = synthetic_top_indices(num_experts, top_k, 3000, clusters, strength, seed)
    layer = _layers(top, num_experts)[source]
    assert plan_layer(layer, PlannerConfig(ep_size=ep_size)).order == TODAYS_ORDERS[key]


def _plan_cli(tmp_path, name, *args):
    out = tmp_path / name
    rc = main(["plan", "--collab", str(tmp_path / "m.npy"), "--top-k", "4", "--ep", "4",
               "--out", str(out), "--no-progress", *args])
    return rc, out


def test_the_plan_command_bounds_loads_reports_the_tradeoff_and_off_changes_nothing(tmp_path,
                                                                                   capsys):
    top = skewed_top_indices(16, 4, 3000, 4, 2.0, 1.0, seed=9)
    np.save(tmp_path / "m.npy", np.stack([_layers(top, 16)["trace"].counts_EE] * 2))
    assert _plan_cli(tmp_path, "plain.json", "--tradeoff", "none")[0] == 0
    assert _plan_cli(tmp_path, "off.json", "--max-load-imbalance", "off")[0] == 0
    assert (tmp_path / "plain.json").read_bytes() == (tmp_path / "off.json").read_bytes()
    capsys.readouterr()
    rc, out = _plan_cli(tmp_path, "b.json", "--max-load-imbalance", "1.1")
    report = capsys.readouterr().out
    assert rc == 0
    for row in ("identity", "random", "off", "1.25", "1.1 <", "1.05", "busiest rank / mean"):
        assert row in report, row
    plan = read_plan(str(out))
    for layer in plan.layers:
        assert layer.load_bound["max_load_imbalance"] == 1.1
        assert layer.predicted_busiest_rank_load["planned"] <= max(
            1.1, layer.load_bound["smallest_rank"]) + EPS
    off = json.loads((tmp_path / "off.json").read_text())
    assert "load_bound" not in off["layers"][0] and "num_nodes" not in off


@pytest.mark.parametrize(
    "args,match",
    [(["--max-load-imbalance", "0.9"], "'0.9' is not a bound"),
     (["--max-load-imbalance", "inf"], "'inf' is not a bound"),
     (["--tradeoff", "1.1,x"], "'x' is not a bound"),
     (["--nodes", "3"], "--nodes 3 must divide --ep 4"),
     (["--gpus-per-node", "0"], "--gpus-per-node=0 must be >= 1"),
     (["--nodes", "2", "--gpus-per-node", "2"], "not allowed with argument")],
    ids=["below_1", "infinite", "bad_tradeoff", "nodes_not_dividing", "zero_gpus", "both"],
)
def test_bad_bounds_and_node_counts_fail_in_one_line_and_write_nothing(tmp_path, capsys, args,
                                                                      match):
    np.save(tmp_path / "m.npy", np.ones((16, 16)) - np.eye(16))
    try:
        rc = _plan_cli(tmp_path, "p.json", *args)[0]
    except SystemExit as exc:  # argparse's own errors exit (one line, status 2)
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.json").exists()


def test_plan_files_carry_the_new_predictions_and_old_files_still_read(tmp_path):
    old = {"num_experts": 4, "ep_size": 2, "top_k": 2, "layers": [
        {"layer": 0, "groups": [[0, 3], [1, 2]], "expert_to_rank": [0, 1, 1, 0],
         "predicted_ranks_per_token": {"identity": 2.0, "random": 1.9, "planned": 1.5},
         "exact": False}]}
    plan = plan_from_json(old)
    layer = plan.layers[0]
    assert plan.num_nodes is None and layer.load_bound is None
    assert layer.predicted_busiest_rank_load is None and layer.predicted_nodes_per_token is None
    new = json.loads(json.dumps(old))
    new["num_nodes"] = 2
    new["layers"][0].update(predicted_busiest_rank_load={"identity": 1.2, "planned": 1.05},
                            load_bound={"max_load_imbalance": 1.1, "smallest_rank": 1.01,
                                        "smallest_exact": True})
    back = plan_from_json(json.loads(json.dumps(plan_from_json(new).to_json())))
    assert back.num_nodes == 2 and back.layers[0].load_bound["smallest_exact"] is True
    assert back.layers[0].predicted_busiest_rank_load == {"identity": 1.2, "planned": 1.05}
    bad = json.loads(json.dumps(new))
    bad["layers"][0]["load_bound"] = {"max_load_imbalance": "tight"}
    with pytest.raises(ValueError, match=r"layers\[0\]\.load_bound="):
        plan_from_json(bad)
    bad["layers"][0]["load_bound"] = None
    bad["num_nodes"] = 3
    with pytest.raises(ValueError, match="num_nodes=3 must be >= 1 and divide ep_size=2"):
        plan_from_json(bad)
