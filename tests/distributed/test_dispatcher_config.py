"""Selecting the dispatcher per model, and rejecting what it does not implement with one-line
errors that name the field, its value and the fix (on real gloo groups and megatron.core)."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_c2r.compat import moe_submodules
import torch.distributed as dist

from tests.distributed.test_dispatcher_equivalence import build_layer
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config


def _error_of(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _config_errors():
    """Constructor-time rejections (no collective is involved, nothing is built)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r.moe.layer import C2RMoELayer

    spec = get_moe_module_spec(use_te=False, num_experts=8)

    def make(dispatcher="dedup", **overrides):
        return lambda: C2RMoELayer(moe_config(**overrides), moe_submodules(spec), dispatcher=dispatcher)

    init_parallel(ep=2)
    errors = dict(
        dispatcher=_error_of(make(dispatcher="deepep")),
        pad=_error_of(make(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)),
        overlap=_error_of(
            make(moe_shared_expert_intermediate_size=8, moe_shared_expert_overlap=True)
        ),
        graphs=_error_of(make(cuda_graph_impl="local")),  # Megatron's default scope: whole layer
    )
    init_parallel(ep=1, etp=2)
    errors["etp"] = _error_of(make(expert_tensor_parallel_size=2))
    init_parallel(ep=2)
    return errors


@pytest.mark.world_size(2)
def test_unsupported_configs_are_rejected_with_the_field_value_and_fix(dist_pool):
    errors = dist_pool(2).run(_config_errors)[0]
    assert "dispatcher='deepep'" in errors["dispatcher"] and "'dedup'" in errors["dispatcher"]
    assert "moe_pad_expert_input_to_capacity=True" in errors["pad"] and "=False" in errors["pad"]
    assert "moe_shared_expert_overlap=True" in errors["overlap"]
    assert "expert_tensor_parallel_size=2" in errors["etp"] and "=1" in errors["etp"]
    graphs = moe_config()  # 0.19+ renamed the scope field (the old name migrates)
    scope = "cuda_graph_modules" if hasattr(graphs, "cuda_graph_modules") else "cuda_graph_scope"
    assert f"cuda_graph_impl='local' with {scope}=[]" in errors["graphs"]
    assert all("\n" not in e for e in errors.values())


def _bad_routing_map_on_rank0():
    """Rank 0 routes a token to 3 experts of one rank with topk=2; rank 1's map is fine. Both ranks
    must raise (the bad count travels with the count exchange), so nobody hangs."""
    layer = build_layer("dedup", 2, moe_router_topk=2)
    T = 4
    routing_map = torch.zeros(T, 8, dtype=torch.bool)
    routing_map[:, [0, 5]] = True
    if dist.get_rank() == 0:
        routing_map[0, 1:3] = True  # experts 0, 1, 2: three on EP rank 0
    probs = routing_map.float() / 2
    x = torch.randn(T, 1, 16)
    dispatcher = layer.token_dispatcher
    dtype_error = _error_of(lambda: dispatcher.dispatch_preprocess(x, probs, probs))
    count_error = _error_of(  # raised at the count table's host copy, before any row moves
        lambda: dispatcher.token_dispatch(*dispatcher.dispatch_preprocess(x, routing_map, probs))
    )
    return dtype_error, count_error


@pytest.mark.world_size(2)
def test_a_bad_routing_map_raises_on_every_rank_instead_of_hanging(dist_pool):
    results = dist_pool(2).run(_bad_routing_map_on_rank0)
    for dtype_error, count_error in results:
        assert "routing_map must be bool" in dtype_error
        assert "3 experts of one EP rank" in count_error and "moe_router_topk=2" in count_error


def _selection():
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron_c2r.compat import build_from_spec

    from megatron_c2r.moe.dispatcher import DedupAlltoAllTokenDispatcher
    from megatron_c2r.moe.layer import C2RMoELayer, c2r_moe_spec

    init_parallel(ep=2)
    config = moe_config()
    stock = get_moe_module_spec(use_te=False, num_experts=8)
    out = {}
    # 0.16/0.17 ModuleSpec shape, built the way TransformerLayer builds its mlp (no pg_collection).
    layer = build_from_spec(c2r_moe_spec(stock, dispatcher="dedup"), config=config)
    out["dedup"] = type(layer) is C2RMoELayer and isinstance(
        layer.token_dispatcher, DedupAlltoAllTokenDispatcher
    )
    out["config_restored"] = config.moe_token_dispatcher_type == "alltoall"
    with megatron_cpu():
        layer = build_from_spec(c2r_moe_spec(stock, dispatcher="megatron"), config=config)
    out["megatron"] = isinstance(layer.token_dispatcher, MoEAlltoAllTokenDispatcher)
    # 0.18+ shape: functools.partial(MoELayer, submodules=...).
    partial_spec = functools.partial(MoELayer, submodules=moe_submodules(stock))
    layer = c2r_moe_spec(partial_spec)(config=config)
    out["partial"] = isinstance(layer.token_dispatcher, DedupAlltoAllTokenDispatcher)
    out["stats"] = layer.comm_stats is layer.token_dispatcher.comm_stats
    return out


@pytest.mark.world_size(2)
def test_the_spec_selects_our_dispatcher_or_megatrons_per_model(dist_pool):
    assert dist_pool(2).run(_selection)[0] == dict(
        dedup=True, config_restored=True, megatron=True, partial=True, stats=True
    )
