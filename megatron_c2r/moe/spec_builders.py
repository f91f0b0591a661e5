"""Layer and block specs whose MoE layers use the C2R router and (optionally) our dispatcher.

We never build layers ourselves: we take the spec Megatron would build and swap two things in
each MoE layer spec, through the spec's own seams,

    MoESubmodules.router  -> functools.partial(C2RRouter, c2r_config=...)    (dataclasses.replace)
    the layer class       -> C2RMoELayer(dispatcher="dedup", hierarchy=...)  (only for "dedup")

so everything else Megatron decided (transformer-engine or local modules, grouped GEMM, shared
experts, ``moe_layer_freq`` dense/MoE interleave, MLA, pipeline slicing) is kept. Both MoE spec
shapes work: ``ModuleSpec`` (0.16/0.17) and ``functools.partial`` (0.18+), via ``compat``.

Entry points:
    get_c2r_decoder_block_spec(config, options, use_transformer_engine=...)  block spec for GPTModel
    apply_c2r_to_block_spec / apply_c2r_to_layer_spec / apply_c2r_to_moe_spec  for specs you built
    c2r_transformer_layer_spec(options)   a callable for Megatron-Bridge's ``transformer_layer_spec``
Module-level objects for ``pretrain_gpt.py --spec`` live in ``megatron_c2r.specs``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_c2r import compat
from megatron_c2r.moe.bigmac import low_dim_moe_spec
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.moe.layer import TopologyMemo, c2r_moe_spec
from megatron_c2r.moe.router import C2RRouter


def is_moe_spec(spec: Any) -> bool:
    """True if ``spec`` (ModuleSpec or partial) builds an MoE layer."""
    if spec is None or not (compat.is_partial_spec(spec) or hasattr(spec, "module")):
        return False
    cls = compat.moe_layer_class(spec)
    return isinstance(cls, type) and issubclass(cls, BaseMoELayer)


def c2r_router_builder(options: C2ROptions) -> Callable:
    """``MoESubmodules.router`` value: ``C2RRouter`` bound to ``options.router``."""
    return functools.partial(C2RRouter, c2r_config=options.router)


def apply_c2r_to_moe_spec(
    moe_spec: Any, options: C2ROptions, topology_memo: Optional[TopologyMemo] = None
) -> Any:
    """A copy of one MoE layer spec with our router and, for ``dispatcher='dedup'``, our layer
    (``options.hierarchy``, ``options.gpus_per_node``; layers built from specs sharing
    ``topology_memo`` learn the node layout once). ``options.enabled=False`` returns the spec
    unchanged (the baseline)."""
    if not options.enabled:
        return moe_spec
    spec = compat.replace_moe_submodules(moe_spec, router=c2r_router_builder(options))
    if options.dispatcher == "dedup":
        spec = c2r_moe_spec(
            spec, dispatcher="dedup", hierarchy=options.hierarchy,
            gpus_per_node=options.gpus_per_node, topology_memo=topology_memo,
        )  # fmt: skip
    if options.dispatch_dim is not None:  # BigMac: the same layer at width d (moe/bigmac.py)
        spec = low_dim_moe_spec(spec, dispatch_dim=options.dispatch_dim,
                                dispatch_ffn_hidden_size=options.dispatch_ffn_hidden_size)
    return spec


def apply_c2r_to_layer_spec(
    layer_spec: Any, options: C2ROptions, topology_memo: Optional[TopologyMemo] = None
) -> Any:
    """A copy of a transformer layer spec whose ``mlp`` is C2R'd if it is an MoE layer; dense
    layer specs come back unchanged (so ``moe_layer_freq`` patterns survive)."""
    submodules = compat.layer_submodules(layer_spec)
    if submodules is None or not is_moe_spec(getattr(submodules, "mlp", None)):
        return layer_spec
    return compat.replace_layer_submodules(
        layer_spec, mlp=apply_c2r_to_moe_spec(submodules.mlp, options, topology_memo)
    )


def apply_c2r_to_block_spec(block_spec: Any, options: C2ROptions) -> Any:
    """A block spec (``TransformerBlockSubmodules``) or a single layer spec, C2R'd. The block's
    MoE layers share one :class:`TopologyMemo` (one node-layout all-gather per block, not per
    layer, under ``hierarchy: auto``)."""
    memo = TopologyMemo()
    if isinstance(block_spec, TransformerBlockSubmodules):
        layers = [apply_c2r_to_layer_spec(s, options, memo) for s in block_spec.layer_specs]
        return TransformerBlockSubmodules(layer_specs=layers, layer_norm=block_spec.layer_norm)
    return apply_c2r_to_layer_spec(block_spec, options, memo)


def get_c2r_decoder_block_spec(
    config,
    options: C2ROptions,
    *,
    use_transformer_engine: bool,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Megatron's ``get_gpt_decoder_block_spec`` (same arguments) with C2R MoE layers.

    Args:
        config: the model's ``TransformerConfig`` (num_moe_experts, moe_layer_freq, ...).
        options: ``C2ROptions`` (router config, dispatcher; ``enabled=False`` = stock spec).
        use_transformer_engine: TE modules (GPU) or Megatron's local modules (CPU-capable).
    Returns the block spec for this pipeline stage (and virtual stage).
    """
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return apply_c2r_to_block_spec(block, options)


def c2r_transformer_layer_spec(
    options: Optional[C2ROptions] = None, *, use_transformer_engine: Optional[bool] = None
) -> Callable:
    """A callable for Megatron-Bridge's ``GPTModelProvider.transformer_layer_spec``.

    Bridge calls it with the provider (a ``TransformerConfig`` subclass) and, in newer releases,
    ``vp_stage=``; it returns the C2R block spec. ``use_transformer_engine`` None -> follow the
    provider's ``transformer_impl`` (``"transformer_engine"`` -> TE) when it has one, else TE if
    installed. ``normalization`` follows the provider's ``normalization`` field.

        provider.transformer_layer_spec = c2r_transformer_layer_spec(C2ROptions(...))
    """
    options = options if options is not None else C2ROptions()

    def transformer_layer_spec(config, vp_stage: Optional[int] = None, **_ignored):
        use_te = use_transformer_engine
        if use_te is None:
            impl = getattr(config, "transformer_impl", None)
            use_te = impl == "transformer_engine" if impl is not None else compat.HAVE_TE
        return get_c2r_decoder_block_spec(
            config,
            options,
            use_transformer_engine=use_te,
            normalization=getattr(config, "normalization", None),
            qk_l2_norm=bool(getattr(config, "qk_l2_norm", False)),
            vp_stage=vp_stage,
        )

    transformer_layer_spec.c2r_options = options
    return transformer_layer_spec
