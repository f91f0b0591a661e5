"""Row/byte accounting: brute-force counts, Megatron comparison, the uniform-routing formula."""

import pytest
import torch

from megatron_c2r.comm import (
    CommStats,
    build_send_rows,
    count_rows,
    expected_ranks_per_token_uniform,
    stats_from_counts,
)
from megatron_c2r.comm.reference import reference_send_rows


def uniform_routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    top_TK = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    return torch.zeros(T, E, dtype=torch.bool).scatter(1, top_TK, True)


@pytest.mark.parametrize(
    "E,k,P,expected",
    [(16, 4, 4, 2.912), (64, 8, 8, 5.433), (60, 4, 4, 2.778), (8, 2, 8, 2.0), (128, 8, 16, 6.597)],
)
def test_the_uniform_formula_matches_the_published_values(E, k, P, expected):
    assert expected_ranks_per_token_uniform(E, k, P) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("E,k,P", [(16, 4, 4), (64, 8, 8), (8, 2, 2)])
def test_uniform_random_routing_ships_the_expected_ranks_per_token_within_two_percent(E, k, P):
    routing_map_TE = uniform_routing(20000, E, k, seed=E + k)
    measured = count_rows(routing_map_TE, P, rank=0)["ranks_per_token"]
    assert measured == pytest.approx(expected_ranks_per_token_uniform(E, k, P), rel=0.02)


def test_group_routing_with_one_rank_per_token_ships_exactly_one_row_per_token():
    T, E, k, P = 4000, 16, 4, 4
    g = torch.Generator().manual_seed(1)
    rank_T = torch.randint(0, P, (T,), generator=g)
    local_TK = torch.rand(T, E // P, generator=g).topk(k, dim=1).indices
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool)
    routing_map_TE.scatter_(1, rank_T[:, None] * (E // P) + local_TK, True)
    counts = count_rows(routing_map_TE, P, rank=0)
    assert counts["ranks_per_token"] == 1.0
    assert counts["megatron_rows"] == k * counts["rows"]


def test_counters_equal_a_brute_force_count_from_the_routing_map():
    T, E, k, P, rank = 50, 16, 4, 4, 2
    routing_map_TE = uniform_routing(T, E, k, seed=5)
    rows = reference_send_rows(routing_map_TE, routing_map_TE.float(), P)
    send = build_send_rows(routing_map_TE, routing_map_TE.float(), P, num_slots=4)
    table = send.counts_PC.tolist()
    stats = stats_from_counts(
        table, table, rank=rank, tokens=T, routed_tokens=int(send.routed_tokens),
        hidden_bytes_per_row=100, meta_bytes_per_row=10, prob_bytes=4,
    )  # fmt: skip
    remote = sum(1 for _, dst, _ in rows if dst != rank)
    assert stats.rows_dispatched == len(rows) == count_rows(routing_map_TE, P, rank)["rows"]
    assert stats.rows_dispatched_remote == remote
    assert stats.bytes_dispatched_remote == remote * 110
    pairs_remote = sum(len(ex) for _, dst, ex in rows if dst != rank)
    assert stats.megatron_rows_dispatched == T * k
    assert stats.megatron_rows_dispatched_remote == pairs_remote
    assert stats.megatron_bytes_dispatched_remote == pairs_remote * 104
    assert stats.ranks_per_token == len(rows) / T


def test_stats_accumulate_over_calls_and_reset_to_zero():
    total = CommStats()
    total.record(CommStats(calls=1, tokens=4, routed_tokens=4, rows_dispatched=6))
    total.record(CommStats(calls=1, tokens=4, routed_tokens=4, rows_dispatched=4))
    assert (total.calls, total.rows_dispatched, total.ranks_per_token) == (2, 10, 1.25)
    total.reset()
    assert total == CommStats()
    assert total.as_dict()["ranks_per_token"] == 0.0
