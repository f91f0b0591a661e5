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
