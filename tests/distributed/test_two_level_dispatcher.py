"""The two-level dispatcher on real gloo process groups with simulated nodes (``gpus_per_node``),
through real megatron.core MoE layers: equal to Megatron's alltoall dispatcher and to our flat
dedup dispatcher (output, input grad, expert weight grads, router / probs grad) at 2x2, 2x4 and
4x2 (nodes x ranks), with shared experts, capacity dropping, TP=2 + sequence parallel and the edge
cases; rows on each hop equal a brute-force count from all ranks' routing maps; the host-sync
budget; topology discovery through the real all-gather and the dispatcher selection.

The two-level dispatcher is installed by swapping ``layer.token_dispatcher`` of a
``C2RMoELayer`` (what the layer will do for ``c2r.hierarchy``); Megatron's layer is the oracle.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_c2r.comm.accounting import count_rows
from megatron_c2r.comm.reference import reference_hop_counts
from megatron_c2r.comm.two_level import (
    count_two_level_rows,
    expected_inter_node_rows_per_token_uniform,
)
from tests.distributed.test_dispatcher_equivalence import (
    H,
    TOL,
    build_layer,
    compare,
    inputs,
    run_layer,
)
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config


# ----------------------------------------------------------------------------------------------
# Helpers (run inside workers)
# ----------------------------------------------------------------------------------------------
def two_level(layer, gpus_per_node):
    """Install the two-level dispatcher in a built ``C2RMoELayer`` (weights untouched)."""
    from megatron_c2r.moe.two_level_dispatcher import TwoLevelDedupTokenDispatcher

    layer.token_dispatcher = TwoLevelDedupTokenDispatcher(
        layer.num_local_experts,
        layer.local_expert_indices,
        config=layer.config,
        gpus_per_node=gpus_per_node,
    )
    return layer


def hop_mismatches(dispatcher, routing_map) -> dict:
    """Everything the dispatcher counted in its last forward that differs from a brute-force count
    over all EP ranks' routing maps (empty dict = all equal)."""
    group, topo = dispatcher.ep_group, dispatcher.topology
    maps = [None] * dist.get_world_size(group)
    dist.all_gather_object(maps, routing_map.detach(), group=group)
    want = reference_hop_counts(maps, topo.ranks_per_node)[topo.rank]
    plan, stats = dispatcher.plan, dispatcher.last_stats
    bad = {k: (getattr(plan, k), v) for k, v in want.items() if getattr(plan, k) != v}
    analytic = count_two_level_rows(routing_map, topo)
    flat = count_rows(routing_map, topo.ep_size, topo.rank)
    pairs = dict(
        inter_node_rows_sent=(stats.inter_node_rows_sent, analytic["inter_node_rows"]),
        own_node_rows=(stats.own_node_rows, analytic["own_node_rows"]),
        inter_node_rows_received=(stats.inter_node_rows_received, sum(want["hop1_recv"])),
        intra_node_rows_sent=(stats.intra_node_rows_sent, sum(want["hop2_send"])),
        intra_node_rows_received=(stats.intra_node_rows_received, sum(want["hop2_recv"])),
        rows_dispatched=(stats.rows_dispatched, flat["rows"]),
        flat_inter_node_rows=(stats.flat_inter_node_rows, analytic["flat_inter_node_rows"]),
        megatron_rows=(stats.megatron_rows_dispatched, flat["megatron_rows"]),
        megatron_inter_node_rows=(
            stats.megatron_inter_node_rows, analytic["megatron_inter_node_rows"]
        ),
        routed_tokens=(stats.routed_tokens, analytic["routed_tokens"]),
    )  # fmt: skip
    bad.update({k: v for k, v in pairs.items() if v[0] != v[1]})
    return bad


def node_case_routing(case, T, k, topo, E, seed):
    """Routing maps for the node-level edge cases (same on every call with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    K, own = E // topo.num_nodes, topo.node
    if case == "random":
        chosen = scores.topk(k, dim=1).indices
    elif case == "only_node0":  # every other node receives nothing
        chosen = scores[:, :K].topk(k, dim=1).indices
    elif case == "own_node":  # every token's experts on its own node: hop 1 carries nothing
        chosen = scores[:, own * K : (own + 1) * K].topk(k, dim=1).indices + own * K
    elif case == "one_expert":  # all tokens of all ranks to one expert on the last node (k = 1)
        chosen = torch.full((T, 1), E - 1)
    elif case == "remote_only":  # no expert on the token's own node
        scores[:, own * K : (own + 1) * K] = -1.0
        chosen = scores.topk(k, dim=1).indices
    else:
        raise ValueError(case)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, chosen, True)
    return routing_map, torch.where(routing_map, scores.softmax(dim=1), 0.0)


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------
def _router_driven(ep, tp, gpus_per_node, tokens_per_rank, overrides):
    """Full layer forward+backward with the stock TopKRouter: two-level vs Megatron vs flat."""
    x, grad_out = inputs(tokens_per_rank)
    with megatron_cpu():  # the stock router's gating and the stock dispatcher need it
        ours = two_level(build_layer("dedup", ep, tp, **overrides), gpus_per_node)
        flat = build_layer("dedup", ep, tp, **overrides)
        theirs = build_layer("megatron", ep, tp, **overrides)
        flat.load_state_dict(ours.state_dict())
        theirs.load_state_dict(ours.state_dict())
        got = run_layer(ours, x, grad_out)
        want, flat_got = run_layer(theirs, x, grad_out), run_layer(flat, x, grad_out)
        _, routing_map = ours.router(x.detach())
    dispatcher = ours.token_dispatcher
    return dict(
        vs_megatron=compare(got, want),
        vs_flat=compare(got, flat_got),
        hops=hop_mismatches(dispatcher, routing_map),
        nodes=dispatcher.topology.num_nodes,
        inter_node_rows=dispatcher.last_stats.inter_node_rows_sent,
        dropped=int(routing_map.sum()) < routing_map.shape[0] * ours.config.moe_router_topk,
    )


def _routing_driven(ep, gpus_per_node, tokens_per_rank, case, k, E, dtype_name="float32"):
    """Stage-driven forward+backward with an edge-case routing map; ours runs without the CPU
    patches (product code needs none)."""
    dtype = getattr(torch, dtype_name)
    overrides = dict(moe_router_topk=k, num_moe_experts=E, moe_router_pre_softmax=k == 1)
    if dtype is torch.bfloat16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    x, grad_out = inputs(tokens_per_rank, seed=7, dtype=dtype)
    ours = two_level(build_layer("dedup", ep, **overrides), gpus_per_node)
    dispatcher = ours.token_dispatcher
    routing = node_case_routing(case, x.shape[0], k, dispatcher.topology, E, seed=dist.get_rank())
    got = run_layer(ours, x, grad_out, routing)
    flat = build_layer("dedup", ep, **overrides)
    flat.load_state_dict(ours.state_dict())
    flat_got = run_layer(flat, x, grad_out, routing)
    with megatron_cpu():
        theirs = build_layer("megatron", ep, **overrides)
        theirs.load_state_dict(ours.state_dict())
        want = run_layer(theirs, x, grad_out, routing)
    stats = dispatcher.last_stats
    return dict(
        vs_megatron=compare(got, want),
        vs_flat=compare(got, flat_got),
        hops=hop_mismatches(dispatcher, routing[0]),
        tokens=x.shape[0],
        received=stats.intra_node_rows_received,
        inter_node_rows=stats.inter_node_rows_sent,
        own_node_rows=stats.own_node_rows,
        tokens_per_expert=list(dispatcher.plan.tokens_per_expert),
    )


def check(results, tol=TOL):
    for rank, r in enumerate(results):
        for ref in ("vs_megatron", "vs_flat"):
            bad = {k: v for k, v in r[ref].items() if not v <= tol}
            assert not bad, f"rank {rank} {ref}: {bad}"
        assert r["hops"] == {}, f"rank {rank}: counters differ from brute force: {r['hops']}"


# ----------------------------------------------------------------------------------------------
# Equivalence: layouts, shared experts, dropping, TP + SP
# ----------------------------------------------------------------------------------------------
@pytest.mark.world_size(4)
def test_two_level_equals_megatron_and_flat_at_2_nodes_x_2_ranks(dist_pool):
    results = dist_pool(4).run(_router_driven, 4, 1, 2, [5, 7, 6, 4], dict(moe_router_topk=3))
    check(results)
    assert {r["nodes"] for r in results} == {2}
    assert sum(r["inter_node_rows"] for r in results) > 0


@pytest.mark.world_size(4)
def test_shared_experts_and_capacity_dropping_match_megatron_and_flat(dist_pool):
    overrides = dict(
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=8,
        moe_expert_capacity_factor=0.5,
        moe_token_drop_policy="probs",
    )
    results = dist_pool(4).run(_router_driven, 4, 1, 2, [8, 8, 8, 8], overrides)
    check(results)
    assert any(r["dropped"] for r in results)  # some tokens were dropped


@pytest.mark.world_size(8)
@pytest.mark.parametrize(
    "gpus_per_node,k", [(4, 4), (2, 3)], ids=["2_nodes_x_4_ranks", "4_nodes_x_2_ranks"]
)
def test_two_level_equals_megatron_and_flat_at_eight_ranks(dist_pool, gpus_per_node, k):
    overrides = dict(moe_router_topk=k, num_moe_experts=16)
    tokens = [5, 7, 6, 4, 3, 8, 6, 5]
    results = dist_pool(8).run(_router_driven, 8, 1, gpus_per_node, tokens, overrides)
    check(results)
    assert {r["nodes"] for r in results} == {8 // gpus_per_node}


@pytest.mark.world_size(8)
def test_tensor_parallel_2_with_sequence_parallel_at_2_nodes_x_2_ranks(dist_pool):
    # World 8 = TP 2 x EP 4 (expert TP 1): each EP group is 4 consecutive ranks = 2 nodes of 2.
    results = dist_pool(8).run(_router_driven, 4, 2, 2, [6] * 8, dict(moe_router_topk=2))
    check(results)
    assert {r["nodes"] for r in results} == {2}


EDGE_CASES = [
    # (ep, gpus per node, tokens per rank, case, k, experts)
    (4, 2, [6, 5, 7, 3], "only_node0", 2, 8),  # node 1 receives nothing
    (4, 2, [5, 5, 6, 4], "own_node", 3, 8),  # all of a token's experts on its own node
    (4, 2, [5, 9, 1, 3], "one_expert", 1, 8),  # all tokens to one node; uneven token counts
    (4, 2, [4, 6, 5, 3], "remote_only", 2, 8),  # no own-node rows at all
    (4, 4, [7, 5, 6, 2], "random", 4, 8),  # one node: the two-level path degenerates to flat
    (4, 1, [3, 6, 5, 4], "random", 3, 8),  # one rank per node: hop 2 stays on the device
    (8, 2, [5, 3, 6, 4, 7, 2, 5, 4], "own_node", 2, 16),  # 4x2
]


@pytest.mark.parametrize(
    "ep,gpus_per_node,tokens,case,k,E",
    EDGE_CASES,
    ids=[f"{c[3]}-{c[0] // c[1]}x{c[1]}-k{c[4]}" for c in EDGE_CASES],
)
def test_edge_case_routing_matches_megatron_and_flat(
    dist_pool, ep, gpus_per_node, tokens, case, k, E
):
    results = dist_pool(ep).run(_routing_driven, ep, gpus_per_node, tokens, case, k, E)
    check(results)
    G = gpus_per_node
    if case == "only_node0":
        assert [r["received"] > 0 for r in results] == [True] * G + [False] * (ep - G)
    if case == "own_node":
        assert all(r["inter_node_rows"] == 0 and r["own_node_rows"] == r["tokens"] for r in results)
    if case == "one_expert":
        assert results[-1]["tokens_per_expert"] == [0, sum(tokens)]
        assert sum(r["inter_node_rows"] for r in results) == sum(tokens[: ep - G])
    if case == "remote_only":
        assert all(r["own_node_rows"] == 0 for r in results)


@pytest.mark.world_size(4)
def test_bf16_hidden_states_match_megatron_and_flat(dist_pool):
    results = dist_pool(4).run(_routing_driven, 4, 2, [6, 5, 7, 4], "random", 3, 8, "bfloat16")
    check(results, tol=2e-2)


# ----------------------------------------------------------------------------------------------
# Rows per token under uniform routing
# ----------------------------------------------------------------------------------------------
def _uniform_volume(E, k, T, gpus_per_node):
    from megatron_c2r.moe.two_level_dispatcher import TwoLevelDedupTokenDispatcher

    P, rank = dist.get_world_size(), dist.get_rank()
    init_parallel(ep=P)
    config = moe_config(num_moe_experts=E, moe_router_topk=k)
    L = E // P
    d = TwoLevelDedupTokenDispatcher(
        L, list(range(rank * L, (rank + 1) * L)), config, gpus_per_node=gpus_per_node
    )
    g = torch.Generator().manual_seed(rank)
    chosen = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, chosen, True)
    x_QH, _ = d.token_dispatch(
        *d.dispatch_preprocess(torch.randn(T, 1, 8), routing_map, routing_map.float())
    )
    s = d.last_stats
    totals = torch.tensor(
        [s.inter_node_rows_sent, s.inter_node_rows_received, s.routed_tokens,
         s.intra_node_rows_sent, x_QH.shape[0], s.rows_dispatched, s.flat_inter_node_rows,
         s.megatron_inter_node_rows, len(hop_mismatches(d, routing_map))],
        dtype=torch.float64,
    )  # fmt: skip
    dist.all_reduce(totals)
    return totals.tolist()


@pytest.mark.parametrize(
    "world,gpus_per_node,E,k",
    [(4, 2, 16, 4), (8, 2, 32, 4)],
    ids=["2_nodes_x_2_ranks", "4_nodes_x_2_ranks"],
)
def test_uniform_routing_inter_node_rows_per_token_match_the_formula_within_two_percent(
    dist_pool, world, gpus_per_node, E, k
):
    T = 600  # per rank; the 2% band is > 4 standard errors at both sizes
    nodes = world // gpus_per_node
    (inter, inter_recv, routed, intra, received, rank_rows, flat_inter, megatron_inter,
     mismatches) = dist_pool(world).run(_uniform_volume, E, k, T, gpus_per_node)[0]  # fmt: skip
    want = expected_inter_node_rows_per_token_uniform(E, k, nodes)
    assert inter / routed == pytest.approx(want, rel=0.02)
    assert mismatches == 0
    assert inter == inter_recv  # every inter-node row sent is received once
    assert intra == received == rank_rows  # one relayed row per (token, rank), received once
    assert inter < flat_inter < megatron_inter  # per node < per rank < per expert


# ----------------------------------------------------------------------------------------------
# Host syncs and bad input
# ----------------------------------------------------------------------------------------------
def _sync_budget_and_nonfinite_logits(gpus_per_node):
    """A C2RMoELayer with our C2RRouter (plain top-k) and the two-level dispatcher: sync events
    of one forward+backward (router / rest of the forward / backward), then NaN router weights
    on EP rank 1 only and the error every rank raises."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.routing.config import C2RRouterConfig
    from tests.sync_audit import SyncAudit

    init_parallel(ep=4)
    torch.manual_seed(0)
    config = moe_config(num_layers=1, hidden_size=H, num_moe_experts=8, moe_router_topk=3)
    options = C2ROptions(router=C2RRouterConfig(mode="topk"))
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    layer = build_from_spec(block.layer_specs[0].submodules.mlp, config=config, layer_number=1)
    layer.set_layer_number(1)
    layer = two_level(layer.train(), gpus_per_node)
    layer.token_dispatcher.finite_check_router = layer.router  # as C2RMoELayer wires it
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(12, 1, H, generator=g, requires_grad=True)
    grad = torch.randn(12, 1, H, generator=g)
    audit = SyncAudit().track(layer, x, grad)
    hooks = [
        layer.router.register_forward_pre_hook(lambda *a: setattr(audit, "phase", "router")),
        layer.router.register_forward_hook(lambda *a: setattr(audit, "phase", "forward")),
    ]
    with audit:
        out, _ = layer(x)
        audit.phase = "backward"
        (out * grad).sum().backward()
    for hook in hooks:
        hook.remove()
    if dist.get_rank() == 1:
        with torch.no_grad():
            layer.router.weight[0, 0] = float("nan")
    try:
        layer(x.detach())
        error = None
    except ValueError as e:
        error = str(e)
    return audit.summary(), error


@pytest.mark.world_size(4)
def test_one_host_sync_per_forward_none_in_router_or_backward_and_nan_raises_on_every_rank(
    dist_pool,
):
    for summary, error in dist_pool(4).run(_sync_budget_and_nonfinite_logits, 2):
        assert summary == {"forward": {"Tensor.tolist": 1}}, summary  # the count-table copy
        assert error is not None and "\n" not in error
        assert "NaN/Inf" in error and "EP rank(s) [1]" in error and "two-level" in error


# ----------------------------------------------------------------------------------------------
# Topology discovery (real all-gather) and dispatcher selection
# ----------------------------------------------------------------------------------------------
def _topology_and_selection():
    from megatron_c2r.comm.topology import discover_topology
    from megatron_c2r.moe.two_level_dispatcher import build_dedup_dispatcher

    rank = dist.get_rank()
    discovered = dict(
        hostname=discover_topology(),  # every pool process runs on this machine
        keys=discover_topology(key=f"node-{rank // 2}"),  # the real all-gather, fake hosts
        simulated=discover_topology(gpus_per_node=2),  # no collective
    )
    try:
        discover_topology(key=f"node-{rank % 2}", parallel_sizes={"tensor_model_parallel_size": 1})
        layout_error = None
    except ValueError as e:
        layout_error = str(e)
    init_parallel(ep=4)
    config = moe_config(num_moe_experts=8, moe_router_topk=2)
    local = [2 * rank, 2 * rank + 1]

    def kind(**kw):
        return type(build_dedup_dispatcher(2, local, config, **kw)).__name__

    chosen = dict(
        auto_one_node=kind(),
        auto_two_nodes=kind(gpus_per_node=2),
        flat_two_nodes=kind(hierarchy="flat", gpus_per_node=2),
        two_level_one_node=kind(hierarchy="two_level"),
    )
    try:
        kind(hierarchy="deepep")
        bad_hierarchy = None
    except ValueError as e:
        bad_hierarchy = str(e)
    shapes = {
        k: (t.num_nodes, t.ranks_per_node, t.node, t.local_index) for k, t in discovered.items()
    }
    return shapes, layout_error, chosen, bad_hierarchy


@pytest.mark.world_size(4)
def test_topology_from_the_real_all_gather_and_the_hierarchy_choice(dist_pool):
    for rank, (shapes, layout_error, chosen, bad) in enumerate(
        dist_pool(4).run(_topology_and_selection)
    ):
        assert shapes["hostname"] == (1, 4, 0, rank)
        assert shapes["keys"] == shapes["simulated"] == (2, 2, rank // 2, rank % 2)
        assert "nodes [0, 1, 0, 1]" in layout_error
        assert "tensor_model_parallel_size=1" in layout_error and "\n" not in layout_error
        assert chosen == dict(
            auto_one_node="DedupAlltoAllTokenDispatcher",
            auto_two_nodes="TwoLevelDedupTokenDispatcher",
            flat_two_nodes="DedupAlltoAllTokenDispatcher",
            two_level_one_node="TwoLevelDedupTokenDispatcher",
        )
        assert "c2r.hierarchy='deepep'" in bad and "auto, flat, two_level" in bad


# ----------------------------------------------------------------------------------------------
# EP-wide collectives per forward and backward (issue 22 item 5)
# ----------------------------------------------------------------------------------------------
def _collectives_per_pass():
    """(forward, backward) EP-wide collectives of one layer pass, flat and two-level (2x2)."""
    from unittest import mock

    counts = {}
    for name in ("flat", "two_level"):
        layer = build_layer("dedup", 4, moe_router_topk=4)
        if name == "two_level":
            two_level(layer, gpus_per_node=2)
        x, grad = inputs([6, 3, 5, 7], seed=3)
        calls = []
        real = dist.all_to_all_single

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        with megatron_cpu(), mock.patch.object(dist, "all_to_all_single", counted):
            x = x.detach().requires_grad_()
            out, _ = layer(x)
            forward = len(calls)
            (out * grad).sum().backward()
        counts[name] = (forward, len(calls) - forward)
    return counts


@pytest.mark.world_size(4)
def test_the_two_level_dispatcher_folds_metadata_into_its_hops(dist_pool):
    """Before: two-level 7 forward / 6 backward, flat 4 / 3 (metadata in its own all-to-all).
    Rows and metadata share one buffer: flat 3 / 2; two-level 5 / 4, the floor for a count
    table plus two hops each way, and no more than the flat dispatcher used to issue backward."""
    for counts in dist_pool(4).run(_collectives_per_pass):
        assert counts == {"flat": (3, 2), "two_level": (5, 4)}, counts


def _pair_against_single():
    from megatron_c2r.comm import all_to_all_pair, all_to_all_single

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    send = [[1, 3], [0, 2]][rank]  # rank 1 sends nothing to rank 0
    recv = [[1, 0], [3, 2]][rank]
    results = []
    for a_dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(sum(send), 5, generator=g).to(a_dtype).requires_grad_()
        b = torch.randn(sum(send), 3, generator=g, dtype=torch.float64).requires_grad_()
        a_q, b_q = all_to_all_pair(a, b, recv, send)
        ga_q = torch.randn(a_q.shape, generator=g).to(a_dtype)
        gb_q = torch.randn(b_q.shape, generator=g, dtype=torch.float64)
        ((a_q.float() * ga_q.float()).sum() + (b_q * gb_q).sum()).backward()
        a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        a2_q, b2_q = all_to_all_single(a2, recv, send), all_to_all_single(b2, recv, send)
        ((a2_q.float() * ga_q.float()).sum() + (b2_q * gb_q).sum()).backward()
        results.append(
            torch.equal(a_q, a2_q) and torch.equal(b_q, b2_q) and a_q.dtype == a_dtype
            and torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
        )  # fmt: skip
    return results


@pytest.mark.world_size(2)
def test_all_to_all_pair_equals_two_all_to_alls_forward_and_backward(dist_pool):
    assert dist_pool(2).run(_pair_against_single) == [[True, True], [True, True]]
