"""``benchmarks/comm_volume.py`` end to end at EP=4 on the real dedup dispatcher, without training:
uniform routing against the formula, and the routing rules on planted-collaboration logits standing
in for a trained router."""

from __future__ import annotations

import pytest
import torch

from benchmarks.comm_volume import build_cases, formula_checks, measure_jobs


def _clustered_logits(layers: int, tokens: int, experts: int, clusters: int) -> torch.Tensor:
    """[L, T, E] logits with planted collaboration: each token favours one hidden expert cluster."""
    g = torch.Generator().manual_seed(0)
    cluster_E = torch.randperm(experts, generator=g) % clusters
    topic_LT1 = torch.randint(0, clusters, (layers, tokens, 1), generator=g)
    return torch.randn(layers, tokens, experts, generator=g) + 2.0 * (cluster_E == topic_LT1)


@pytest.mark.world_size(4)
def test_measured_rows_match_the_uniform_formula_and_each_routing_rules_bound(dist_pool, tmp_path):
    E, k, P = 16, 4, 4
    trained = {"logits_LTE": _clustered_logits(2, 2048, E, clusters=4)}
    cases, not_applicable = build_cases("16e4", P, 4096, trained, seed=0)
    path = tmp_path / "jobs.pt"
    torch.save([dict(shape="16e4", experts=E, topk=k, cases=cases)], path)
    results = dist_pool(P).run(measure_jobs, str(path))[0]
    by = {(r["routing"], r["placement"]): r for r in results}

    assert not not_applicable  # 16e top-4 at EP=4: every routing applies (k <= E/P)
    assert all(r["checks_failed"] == 0 for r in results)  # output == input, counters == oracle
    (check,) = formula_checks(results)
    assert check["ok"] and check["formula"] == pytest.approx(2.912, abs=1e-3)
    assert all(r["rows_per_token_alltoall"] == k for r in results)
    assert all(r["combine_rows_per_token"] == r["rows_per_token"] for r in results)
    # Group rules bound the rows; planned placement helps on planted collaboration.
    for name in ("anchored_M1", "group_score_M1"):
        assert by[(name, "planned")]["rows_per_token"] == 1.0
    assert by[("megatron_gl_M1", "megatron")]["rows_per_token"] == 1.0
    for name in ("anchored_M2", "group_score_M2"):
        assert by[(name, "planned")]["rows_per_token"] <= 2.0
    topk = by[("trained_topk", "megatron")]["rows_per_token"]
    assert by[("trained_topk", "planned")]["rows_per_token"] < 0.9 * topk
    # MoGE (k/P = 1 per rank): every token on every rank, every rank exactly the mean load.
    moge = by[("moge", "megatron")]
    assert moge["rows_per_token"] == P and moge["rank_load_imbalance"] == 1.0
    assert moge["rank_received_imbalance"] == 1.0


# ----------------------------------------------------------------------------------------------
# Node mode (benchmarks/node_volume.py): the real two-level and flat dispatchers at 2 nodes x 2
# ----------------------------------------------------------------------------------------------
def _loop_link_loads(indices_TK, experts, nodes, gpus):
    """Brute-force oracle of ``analytic_counts``: walk every token's rows per method."""
    T, P = indices_TK.shape[0], nodes * gpus
    L = experts // P
    loads = {m: torch.zeros(P, 4, dtype=torch.int64) for m in ("alltoall", "flat", "two_level")}

    def ship(method, src, dst):
        if src // gpus != dst // gpus:
            loads[method][src, 0] += 1
            loads[method][dst, 1] += 1
        elif src != dst:
            loads[method][src, 2] += 1
            loads[method][dst, 3] += 1

    for t in range(T):
        src = t // (T // P)
        ranks = sorted({int(e) // L for e in indices_TK[t]})
        for e in indices_TK[t]:
            ship("alltoall", src, int(e) // L)
        for r in ranks:
            ship("flat", src, r)
        for d in sorted({r // gpus for r in ranks}):
            relay = d * gpus + src % gpus
            ship("two_level", src, relay)  # own node: relay == src, nothing shipped
            for r in (r for r in ranks if r // gpus == d):
                ship("two_level", relay, r)
    return loads


@pytest.mark.parametrize("nodes,gpus", [(2, 2), (4, 2), (2, 4)])
def test_analytic_link_loads_equal_a_per_token_walk(nodes, gpus):
    from benchmarks.node_volume import analytic_counts

    g = torch.Generator().manual_seed(nodes * 10 + gpus)
    E, k, T = 16, 4, 96
    idx_TK = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    idx_TK[:8] = torch.arange(k)  # tokens whose experts are all on node 0 / rank 0
    got, want = analytic_counts(idx_TK, E, nodes, gpus), _loop_link_loads(idx_TK, E, nodes, gpus)
    for method in want:
        assert torch.equal(got[method], want[method]), method
    assert torch.equal(got["deepep"], got["two_level"])
    assert int(got["tokens_P"].sum()) == T * k


@pytest.mark.world_size(4)
def test_node_mode_dispatcher_counters_equal_the_analytic_counter_at_2x2(dist_pool, tmp_path):
    from benchmarks.node_volume import (analytic_counts, build_node_cases, case_records,
                                        check_against_count_two_level_rows, goal_lines,
                                        measure_node_jobs, uniform_checks)

    E, k, D, G = 16, 4, 2, 2
    trained = {"logits_LTE": _clustered_logits(2, 1024, E, clusters=4)}
    cases, not_applicable = build_node_cases("16e4", D, G, 2048, trained, seed=0)
    assert {(c["routing"], c["placement"]) for c in cases} >= {
        ("uniform", "megatron"), ("trained_topk", "hierarchical"),
        ("megatron_nl_M1", "megatron"), ("node_anchored_M1", "hierarchical")}
    assert all("M=2 >= N=2" in x["reason"] for x in not_applicable if "M2" in x["routing"])
    path = tmp_path / "jobs.pt"
    torch.save([dict(shape="16e4", experts=E, topk=k, cases=cases)], path)
    gloo = dist_pool(D * G).run(measure_node_jobs, str(path), G)[0]
    records = []
    for case, measured in zip(cases, gloo, strict=True):
        counts_L = [analytic_counts(idx_TK, E, D, G) for idx_TK in case["indices"]]
        assert measured["failed"] == 0  # both dispatchers: output == input
        assert sum(check_against_count_two_level_rows(idx_TK, E, D, G, c)
                   for idx_TK, c in zip(case["indices"], counts_L)) == 0
        recs, mismatches = case_records("16e4", D, G, case, counts_L, measured)
        assert mismatches == 0  # every rank, layer, hop, direction: dispatchers == analytic
        records += recs
    by = {(r["routing"], r["placement"], r["method"]): r for r in records}
    assert all(c["ok"] for c in uniform_checks(records))
    assert goal_lines(records)[1]  # two-level <= DeepEP-style and <= flat everywhere
    for placement in ("megatron", "hierarchical"):
        m1 = by[("node_anchored_M1", placement, "two_level")]
        assert m1["max_nodes_per_token"] == 1
        assert m1["inter_node_rows_per_token"] == pytest.approx(0.5, abs=0.05)  # (N-1)/N
        assert by[("node_anchored_M1", placement, "alltoall")]["inter_node_rows_per_token"] == (
            pytest.approx(k * 0.5, abs=0.3))
    topk = by[("trained_topk", "megatron", "two_level")]["inter_node_rows_per_token"]
    assert by[("trained_topk", "hierarchical", "two_level")]["inter_node_rows_per_token"] < topk
    assert by[("trained_topk", "megatron", "flat")]["inter_node_rows_per_token"] > topk
    # MoGE over nodes (k/N = 2 per node): every token on both nodes, both nodes the mean load.
    moge = by[("moge_nodes", "megatron", "two_level")]
    assert moge["max_nodes_per_token"] == 2 and moge["nodes_per_token"] == 2.0
    assert moge["inter_node_rows_per_token"] == pytest.approx(1.0, abs=0.02)  # 2 x (N-1)/N
    assert moge["busiest_node_tokens_over_mean"] == 1.0
