"""``c2r.hierarchy`` wired through ``C2RMoELayer`` and the spec builders (issue 14 part 2), on 4
real gloo processes with nodes simulated by ``gpus_per_node`` (2 nodes x 2 ranks) or learned from
the processes' hostnames (all on this machine: one node).

The layer built with ``hierarchy='auto'`` over two simulated nodes must be the two-level
dispatcher and compute what the flat one computes (output, input grad, expert grads, router grad,
1e-6 fp32); ``'flat'`` forced gives the flat class. Through the spec builders every MoE layer of
a block shares one topology (one all-gather under auto, counted), the router's deferred
finite-logits check reaches the two-level dispatcher, and node routing whose node count differs
from the dispatcher's nodes is a one-line error on every rank.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_dispatcher_equivalence import FFN, H, TOL, compare, inputs, run_layer
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

E, K = 8, 3


def _layer(hierarchy, gpus_per_node=None, memo=None):
    """A C2RMoELayer (stock TopKRouter) with expert e's weights drawn from a generator seeded by
    e, so layers built with different hierarchies hold the same weights."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r.compat import moe_submodules
    from megatron_c2r.moe.layer import C2RMoELayer

    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E, moe_router_topk=K)
    spec = get_moe_module_spec(use_te=False, num_experts=E)
    torch.manual_seed(1234)
    layer = C2RMoELayer(
        config, moe_submodules(spec), dispatcher="dedup", hierarchy=hierarchy,
        gpus_per_node=gpus_per_node, topology_memo=memo,
    )  # fmt: skip
    L = layer.num_local_experts
    for j, expert in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(100 + dist.get_rank() * L + j)
        for p in expert.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return layer


def _auto_over_two_simulated_nodes():
    init_parallel(ep=4)
    x, grad_out = inputs([5, 7, 6, 4])
    with megatron_cpu():  # the stock router's gating needs it
        auto = _layer("auto", gpus_per_node=2)
        flat = _layer("flat", gpus_per_node=2)
        flat.load_state_dict(auto.state_dict())
        got, want = run_layer(auto, x, grad_out), run_layer(flat, x, grad_out)
    return dict(
        auto=type(auto.token_dispatcher).__name__,
        flat=type(flat.token_dispatcher).__name__,
        nodes=auto.topology.num_nodes,
        flat_topology=flat.topology,
        finite_check=auto.token_dispatcher.finite_check_router is auto.router,
        inter_node_rows=auto.comm_stats.inter_node_rows_sent,
        errors=compare(got, want),
    )


@pytest.mark.world_size(4)
def test_auto_picks_two_level_over_two_nodes_and_equals_flat_and_flat_forced_is_flat(dist_pool):
    for rank, r in enumerate(dist_pool(4).run(_auto_over_two_simulated_nodes)):
        assert r["auto"] == "TwoLevelDedupTokenDispatcher", (rank, r["auto"])
        assert r["flat"] == "DedupAlltoAllTokenDispatcher" and r["flat_topology"] is None
        assert r["nodes"] == 2 and r["inter_node_rows"] > 0  # rows did cross the simulated nodes
        assert r["finite_check"] is False  # the stock router has no deferred check
        bad = {k: v for k, v in r["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: two-level vs flat {bad}"


def _through_the_spec_builders():
    """Two MoE layers built from one block spec: auto on one host (all-gathers counted), auto
    with simulated nodes (NaN router weights on rank 1), and node routing with a wrong count."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=4)
    config = moe_config(num_layers=2, hidden_size=H, num_moe_experts=E, moe_router_topk=K)

    def build(options):
        block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
        layers = []
        for number, layer_spec in enumerate(block.layer_specs, start=1):
            layer = build_from_spec(layer_spec.submodules.mlp, config=config, layer_number=number)
            layers.append(layer)
        return layers

    out = {}
    with mock.patch.object(dist, "all_gather_object", wraps=dist.all_gather_object) as gather:
        one_host = build(C2ROptions(router=C2RRouterConfig(mode="topk")))
    out["one_host"] = [type(m.token_dispatcher).__name__ for m in one_host]
    out["one_host_gathers"] = gather.call_count
    out["shared_topology"] = one_host[0].topology is one_host[1].topology
    simulated = build(C2ROptions(router=C2RRouterConfig(mode="topk", gpus_per_node=2)))
    out["simulated"] = [type(m.token_dispatcher).__name__ for m in simulated]
    layer = simulated[0].train()
    out["finite_check"] = layer.token_dispatcher.finite_check_router is layer.router
    if dist.get_rank() == 1:
        with torch.no_grad():
            layer.router.weight[0, 0] = float("nan")
    try:
        layer(torch.randn(6, 1, H))
        out["nan_error"] = None
    except ValueError as e:
        out["nan_error"] = str(e)
    try:
        build(C2ROptions(router=C2RRouterConfig(mode="node", num_nodes=2, max_nodes=2)))
        out["node_error"] = None
    except ValueError as e:
        out["node_error"] = str(e)
    return out


@pytest.mark.world_size(4)
def test_spec_built_layers_share_one_topology_and_wire_the_finite_check(dist_pool):
    for rank, r in enumerate(dist_pool(4).run(_through_the_spec_builders)):
        assert r["one_host"] == ["DedupAlltoAllTokenDispatcher"] * 2, (rank, r)
        assert r["one_host_gathers"] == 1 and r["shared_topology"]  # one all-gather per block
        assert r["simulated"] == ["TwoLevelDedupTokenDispatcher"] * 2
        assert r["finite_check"]
        error = r["nan_error"]
        assert error is not None and "\n" not in error, (rank, error)
        assert "NaN/Inf" in error and "EP rank(s) [1]" in error and "two-level" in error
        error = r["node_error"]
        assert error is not None and "\n" not in error, (rank, error)
        assert "c2r.num_nodes=2" in error and "spans 1 node(s)" in error and "hostnames" in error
