"""The two-level communicator's pure row functions against their loop oracles (single process):
counts, split plans, node rows, rank rows, expansion, the whole simulated path (values and
gradients) against the dense reference and the flat dedup path, the analytic counter, and the
absence of host syncs in every sized function."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_c2r.comm import two_level as tl
from megatron_c2r.comm.reference import (
    dense_moe_reference,
    reference_expand_rank_rows,
    reference_hop_counts,
    reference_node_rows,
    reference_rank_rows,
    simulate_dedup_moe,
    simulate_two_level_moe,
)
from megatron_c2r.comm.topology import NodeTopology
from tests.sync_audit import SyncAudit

# (ranks P, ranks per node G, experts E, top-k): 2x2, 2x4, 4x2, one node, one rank per node
LAYOUTS = [(4, 2, 8, 2), (8, 4, 16, 4), (8, 2, 16, 3), (4, 4, 8, 3), (4, 1, 8, 3)]
LAYOUT_IDS = [f"{P // G}x{G}-E{E}-k{k}" for P, G, E, k in LAYOUTS]


def routing(T, E, k, seed, case="random", node=0, num_nodes=1, dtype=torch.float64):
    """A top-k routing map + dense probs (zero off the map) for a case."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g, dtype=dtype)
    K = E // num_nodes
    if case == "random":
        chosen = scores.topk(k, dim=1).indices
    elif case == "own_node":  # every expert on the token's own node (min(k, K) of them)
        chosen = scores[:, node * K : (node + 1) * K].topk(min(k, K), dim=1).indices + node * K
    elif case == "last_node":  # all tokens to one node; every other node receives nothing
        chosen = scores[:, E - K :].topk(min(k, K), dim=1).indices + E - K
    else:
        raise ValueError(case)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, chosen, True)
    return routing_map, torch.where(routing_map, scores.softmax(dim=1), 0.0)


def ranks_setup(P, G, E, k, tokens, case="random"):
    topos = [NodeTopology(ep_size=P, ranks_per_node=G, rank=r) for r in range(P)]
    maps, probs = zip(
        *[routing(T, E, k, 10 + r, case, topos[r].node, P // G) for r, T in enumerate(tokens)]
    )
    return topos, list(maps), list(probs)


def plans_for(topos, maps):
    tables = [tl.build_count_table(m, t).counts_PC for m, t in zip(maps, topos)]
    P = len(topos)
    recv = [torch.stack([tables[s][d] for s in range(P)]) for d in range(P)]
    return tables, [tl.plan_hops(tables[r].tolist(), recv[r].tolist(), topos[r]) for r in range(P)]


@pytest.mark.parametrize("count", [0, 1, 5])
def test_true_positions_equal_nonzero_without_a_host_sync(count):
    g = torch.Generator().manual_seed(count)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.randperm(40, generator=g)[:count]] = True
    assert torch.equal(tl.true_positions(mask, count), mask.nonzero().flatten())
    assert tl.true_positions(torch.zeros(0, dtype=torch.bool), 0).shape == (0,)


@pytest.mark.parametrize("case", ["random", "own_node", "last_node"])
@pytest.mark.parametrize("P,G,E,k", LAYOUTS, ids=LAYOUT_IDS)
def test_hop_plans_equal_a_brute_force_count_from_the_routing_maps(P, G, E, k, case):
    tokens = [7, 0, 5, 9, 3, 6, 4, 8][:P]  # uneven, one rank without tokens
    topos, maps, _ = ranks_setup(P, G, E, k, tokens, case)
    _, plans = plans_for(topos, maps)
    for rank, (plan, want) in enumerate(zip(plans, reference_hop_counts(maps, G))):
        got = {key: getattr(plan, key) for key in want}
        assert got == want, f"rank {rank}"
        assert plan.max_experts_per_row == max(
            int(m.view(m.shape[0], P // G, -1).sum(dim=2).max()) if m.numel() else 0 for m in maps
        )
    if case == "own_node":
        assert all(sum(p.hop1_send) == 0 for p in plans)
    if case == "last_node":  # every rank outside the last node receives nothing on hop 2
        assert all(sum(p.hop2_recv) == 0 for r, p in enumerate(plans) if r < P - G)


@pytest.mark.parametrize("P,G,E,k", LAYOUTS, ids=LAYOUT_IDS)
def test_node_rank_and_expert_rows_equal_their_loop_oracles(P, G, E, k):
    L, N = E // P, P // G
    topos, maps, probs = ranks_setup(P, G, E, k, [6, 4, 5, 7, 3, 6, 2, 5][:P])
    tables, plans = plans_for(topos, maps)
    V, S = min(k, G * L), min(k, L)
    rows = [
        tl.build_node_rows(m, p, t, V, table[::G, 0].tolist())
        for m, p, t, table in zip(maps, probs, topos, tables)
    ]
    for r in range(P):
        want = reference_node_rows(maps[r], probs[r], N, topos[r].node)
        meta = rows[r].meta_BA
        got = [
            (int(t), [(int(i), float(p)) for p, i in zip(meta[b, :V], meta[b, V:]) if i >= 0])
            for b, t in enumerate(rows[r].token_idx_B)
        ]
        assert got == [(t, experts) for t, _, experts in want]
    # Relay 0 of node 0 builds rank rows from arbitrary node rows (here: rank 1's), any source.
    node_meta = rows[1].meta_BA
    src_B = torch.arange(node_meta.shape[0]) % P
    node_experts = [
        [(int(i), float(p)) for p, i in zip(m[:V], m[V:]) if i >= 0] for m in node_meta
    ]
    want_rank_rows = reference_rank_rows(node_experts, L, G)
    rank_rows = tl.build_rank_rows(node_meta, src_B, L, G, S, len(want_rank_rows))
    m2 = rank_rows.meta_RW
    got_rank_rows = [
        (int(b), [(int(i), float(p)) for p, i in zip(m2[q, :S], m2[q, S:-1]) if i >= 0])
        for q, b in enumerate(rank_rows.node_row_idx_R)
    ]
    assert got_rank_rows == [(b, experts) for b, _, experts in want_rank_rows]
    assert torch.equal(m2[:, -1].long(), src_B[rank_rows.node_row_idx_R])
    # The destination expands received rank rows in (expert, source rank, arrival) order.
    received = [(int(m2[q, -1]), experts) for q, (_, experts) in enumerate(got_rank_rows)]
    per_expert = reference_expand_rank_rows(received, L)
    row_idx_N, probs_N = tl.expand_rank_rows(m2, L, P, sum(len(e) for e in per_expert))
    want_pairs = [pair for pairs in per_expert for pair in pairs]
    assert list(zip(row_idx_N.tolist(), probs_N.tolist())) == want_pairs


CASES = ["random", "own_node", "last_node"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("P,G,E,k", LAYOUTS, ids=LAYOUT_IDS)
def test_simulated_two_level_path_equals_dense_and_flat_in_values_and_gradients(P, G, E, k, case):
    check_simulated_paths(P, G, E, k, case, "cpu")


def check_simulated_paths(P, G, E, k, case, device):
    """Two-level and flat row paths (host-sized: ``nonzero_static``, the dispatchers' way) with
    the single-process reference all-to-all, against the dense MoE, values and gradients, on
    ``device``. Rank 2 has T = 0; in ``last_node`` every other node receives nothing. The CUDA
    run is in ``tests/gpu/test_cuda_paths.py`` (it caught empty CUDA ``nonzero_static``)."""
    H = 6
    tokens = [5, 7, 0, 4, 6, 3, 8, 2][:P]
    topos, maps, probs = ranks_setup(P, G, E, k, tokens, case)
    maps = [m.to(device) for m in maps]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(T, H, generator=g, dtype=torch.float64).to(device).requires_grad_()
          for T in tokens]  # fmt: skip
    ps = [p.to(device).requires_grad_() for p in probs]
    weights = [torch.randn(H, H, generator=g, dtype=torch.float64).to(device) for _ in range(E)]
    experts = [lambda h, w=w: torch.tanh(h @ w) for w in weights]
    got = simulate_two_level_moe(xs, maps, ps, experts, G, k)
    flat = simulate_dedup_moe(xs, maps, ps, experts, min(k, E // P))
    dense = [dense_moe_reference(x, m, p, experts) for x, m, p in zip(xs, maps, ps)]
    grad_outs = [torch.randn(T, H, generator=g, dtype=torch.float64).to(device) for T in tokens]
    grads = []
    for outs in (got, flat, dense):
        loss = sum((o * w).sum() for o, w in zip(outs, grad_outs))
        grads.append(
            torch.autograd.grad(loss, xs + ps, allow_unused=True, materialize_grads=True)
        )
    for r in range(P):
        torch.testing.assert_close(got[r], dense[r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[r], flat[r], rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads[0], grads[2]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads[0], grads[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("P,G,E,k", LAYOUTS, ids=LAYOUT_IDS)
def test_analytic_counter_and_stats_equal_the_brute_force_hop_counts(P, G, E, k):
    tokens = [9, 4, 6, 5, 7, 3, 8, 2][:P]
    topos, maps, _ = ranks_setup(P, G, E, k, tokens)
    tables, plans = plans_for(topos, maps)
    ref = reference_hop_counts(maps, G)
    L = E // P
    for r, (topo, m, plan) in enumerate(zip(topos, maps, plans)):
        counted = tl.count_two_level_rows(m, topo)
        assert counted["inter_node_rows"] == sum(ref[r]["hop1_send"])
        assert counted["own_node_rows"] == ref[r]["own_rows"]
        node_of = [e // (G * L) for e in range(E)]
        brute = dict(
            rank_rows=sum(len({e // L for e in row.nonzero().flatten().tolist()}) for row in m),
            flat_inter_node_rows=sum(
                len({e // L for e in row.nonzero().flatten().tolist() if node_of[e] != topo.node})
                for row in m
            ),
            megatron_rows=int(m.sum()),
            megatron_inter_node_rows=sum(
                int(m[:, e].sum()) for e in range(E) if node_of[e] != topo.node
            ),
            routed_tokens=int(m.any(dim=1).sum()),
        )
        assert {key: counted[key] for key in brute} == brute
        recv = [tables[s][r].tolist() for s in range(P)]
        stats = tl.two_level_stats(
            plan, tables[r].tolist(), recv, topo, tokens=m.shape[0],
            routed_tokens=counted["routed_tokens"], hidden_bytes_per_row=64,
            meta_bytes_per_column=4, num_slots=(min(k, G * L), min(k, L)), prob_bytes=4,
        )  # fmt: skip
        assert stats.inter_node_rows_sent == counted["inter_node_rows"]
        assert stats.inter_node_rows_received == sum(ref[r]["hop1_recv"])
        assert stats.intra_node_rows_sent == sum(ref[r]["hop2_send"])
        assert stats.intra_node_rows_received == sum(ref[r]["hop2_recv"])
        hop2_remote = sum(ref[r]["hop2_send"]) - ref[r]["hop2_send"][r]
        assert stats.intra_node_rows_sent_remote == hop2_remote
        assert stats.rows_dispatched == counted["rank_rows"]  # the flat meaning, kept
        assert stats.flat_inter_node_rows == counted["flat_inter_node_rows"]
        assert stats.megatron_rows_dispatched == counted["megatron_rows"]
        assert stats.megatron_inter_node_rows == counted["megatron_inter_node_rows"]
        assert stats.inter_node_bytes == stats.inter_node_rows_sent * (64 + 8 * min(
            k, G * L)) + stats.inter_node_rows_received * 64  # fmt: skip
        # Never more inter-node rows than the flat dedup, which never ships more than Megatron.
        assert stats.inter_node_rows_sent <= stats.flat_inter_node_rows
        assert stats.flat_inter_node_rows <= stats.megatron_inter_node_rows


def test_uniform_routing_inter_node_rows_per_token_match_the_formula_within_two_percent():
    E, k, P, G, T = 64, 8, 16, 2, 4000  # 8 nodes
    topo = NodeTopology(ep_size=P, ranks_per_node=G, rank=5)
    routing_map, _ = routing(T, E, k, seed=1, dtype=torch.float32)
    counted = tl.count_two_level_rows(routing_map, topo)
    nodes_TN = routing_map.view(T, P // G, -1).any(dim=2)
    distinct = float(nodes_TN.sum(dim=1).float().mean())
    want = tl.expected_inter_node_rows_per_token_uniform(E, k, P // G)
    assert counted["inter_node_rows"] / T == pytest.approx(want, rel=0.02)
    assert want == pytest.approx(distinct * (P // G - 1) / (P // G), rel=0.02)
    # REFERENCE.md section 10: 256 experts top-8 on 8 nodes -> 5.30 nodes, 4.64 inter-node rows.
    nodes = 8 * (1 - math.comb(256 - 32, 8) / math.comb(256, 8))
    assert nodes == pytest.approx(5.30, abs=0.01)
    assert tl.expected_inter_node_rows_per_token_uniform(256, 8, 8) == pytest.approx(4.64, abs=0.01)


def test_sized_row_functions_make_no_host_sync_forward_or_backward():
    P, G, E, k = 8, 4, 16, 4
    topos, maps, probs = ranks_setup(P, G, E, k, [6] * P)
    tables, plans = plans_for(topos, maps)
    p = probs[2].clone().requires_grad_()
    # Host sizes, as the dispatcher has them after its one count exchange.
    node_rows = tables[2][::G, 0].tolist()
    rank_rows_total, pairs = int(maps[2].view(6, P, -1).any(dim=2).sum()), int(maps[2].sum())
    audit = SyncAudit().track(maps[2], p)  # as if on an accelerator
    with audit:
        counts = tl.build_count_table(maps[2], topos[2])
        rows = tl.build_node_rows(maps[2], p, topos[2], 4, node_rows)
        src_B = torch.zeros(rows.meta_BA.shape[0], dtype=torch.long)
        rank_rows = tl.build_rank_rows(rows.meta_BA, src_B, 2, G, 2, rank_rows_total)
        row_idx_N, probs_N = tl.expand_rank_rows(rank_rows.meta_RW, 2, P, pairs)
        probs_N.sum().backward()
    assert audit.events == [], audit.summary()
    assert counts.counts_PC.shape == (P, G + 2 + 3)  # G rank rows, L = 2 experts, 3 more
    assert torch.equal(p.grad, maps[2].to(p.dtype))  # every routed prob reaches one expert row
