"""C2R layer/block specs on real megatron.core GPT models (CPU, world size 1)."""

import dataclasses
import functools

import pytest
import torch

from megatron_c2r import compat
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config


@pytest.fixture(scope="module")
def world1(megatron_world1):
    init_parallel()
    torch.manual_seed(0)
    yield


def build_gpt(config, spec):
    from megatron.core.models.gpt import GPTModel

    with megatron_cpu():
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)


def as_partial_shape(block):
    """Simulate the 0.18+ shape: every MoE ModuleSpec becomes functools.partial(cls, submodules=)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layers = []
    for layer in block.layer_specs:
        mlp = layer.submodules.mlp
        if hasattr(mlp, "module") and "MoE" in mlp.module.__name__:
            mlp = functools.partial(mlp.module, submodules=mlp.submodules, **(mlp.params or {}))
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
        layers.append(layer)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=block.layer_norm)


def test_every_moe_layer_of_a_built_gpt_carries_our_router_and_dense_layers_stay_dense(world1):
    from megatron_c2r.moe.layer import C2RMoELayer
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron.core.transformer.mlp import MLP

    config = moe_config(num_layers=3, moe_layer_freq=[1, 0, 1], moe_shared_expert_intermediate_size=16)
    options = C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1))
    model = build_gpt(config, get_c2r_decoder_block_spec(config, options, use_transformer_engine=False))
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert [type(m) for m in mlps] == [C2RMoELayer, MLP, C2RMoELayer]
    for moe in (mlps[0], mlps[2]):
        assert isinstance(moe.router, C2RRouter) and moe.router.c2r_config.max_groups == 1
        assert moe.shared_experts is not None
        assert type(moe.token_dispatcher).__name__ == "DedupAlltoAllTokenDispatcher"


def test_megatron_dispatcher_keeps_the_stock_layer_class_and_disabled_keeps_the_stock_router(world1):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    config = moe_config(num_layers=1)
    spec = get_c2r_decoder_block_spec(config, C2ROptions(dispatcher="megatron"), use_transformer_engine=False)
    layer = build_gpt(config, spec).decoder.layers[0].mlp
    assert type(layer) is MoELayer and isinstance(layer.router, C2RRouter)
    spec = get_c2r_decoder_block_spec(config, C2ROptions(enabled=False), use_transformer_engine=False)
    layer = build_gpt(config, spec).decoder.layers[0].mlp
    assert type(layer) is MoELayer and type(layer.router) is TopKRouter


def test_partial_spec_shape_of_newer_megatron_is_rewritten_in_the_same_shape(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron_c2r.moe.layer import C2RMoELayer
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.moe.spec_builders import apply_c2r_to_block_spec

    config = moe_config(num_layers=2)
    stock = as_partial_shape(get_gpt_decoder_block_spec(config, use_transformer_engine=False))
    block = apply_c2r_to_block_spec(stock, C2ROptions())
    for layer in block.layer_specs:
        mlp = layer.submodules.mlp
        assert compat.is_partial_spec(mlp) and mlp.func is C2RMoELayer
        assert mlp.keywords["dispatcher"] == "dedup"
        assert mlp.keywords["submodules"].router.func is C2RRouter
    # 0.16's build_module cannot build a partial; calling it is what 0.18+ does.
    with megatron_cpu():
        layer = block.layer_specs[0].submodules.mlp(config=config)
    assert isinstance(layer, C2RMoELayer) and isinstance(layer.router, C2RRouter)


def test_stock_specs_are_not_mutated(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron_c2r.moe.spec_builders import apply_c2r_to_block_spec

    stock = get_gpt_decoder_block_spec(moe_config(num_layers=1), use_transformer_engine=False)
    apply_c2r_to_block_spec(stock, C2ROptions())
    from megatron_c2r.compat import moe_submodules

    assert moe_submodules(stock.layer_specs[0].submodules.mlp).router is TopKRouter


def test_bridge_callable_builds_a_block_spec_from_the_provider_config(world1):
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.moe.spec_builders import c2r_transformer_layer_spec

    config = moe_config(num_layers=2, moe_layer_freq=[0, 1])
    make_spec = c2r_transformer_layer_spec(C2ROptions(dispatcher="megatron"), use_transformer_engine=False)
    block = make_spec(config, vp_stage=None)
    model = build_gpt(config, block)
    assert not hasattr(model.decoder.layers[0].mlp, "router")
    assert isinstance(model.decoder.layers[1].mlp.router, C2RRouter)
    assert make_spec.c2r_options.dispatcher == "megatron"


def test_module_level_spec_objects_load_like_pretrain_gpt_spec_and_build(world1):
    from megatron.core.transformer.spec_utils import import_module
    from megatron_c2r.moe.router import C2RRouter

    group2 = import_module(("megatron_c2r.specs", "group2_local"))
    from megatron_c2r.compat import moe_submodules

    assert moe_submodules(group2.submodules.mlp).router.keywords["c2r_config"].max_groups == 2
    spec = import_module(("megatron_c2r.specs", "group1_local"))  # EP=1 here: one group
    model = build_gpt(moe_config(num_layers=2, moe_token_dispatcher_type="alltoall"), spec)
    assert all(isinstance(l.mlp.router, C2RRouter) for l in model.decoder.layers)
