"""The GPT model builder and model provider our Megatron-LM entry point hands to ``pretrain()``.

``model_provider(model_builder, pre_process, post_process, vp_stage, config, pg_collection)`` (the
checkout's ``model_provider.py``) is stable from core_v0.16 through 0.20 and calls
``model_builder(args, pre_process, post_process, vp_stage, config=..., pg_collection=...)``;
``c2r_gpt_builder`` is such a builder. It does what Megatron-LM's ``gpt_builder`` does for an
MCore MoE GPT, with our specs (``c2r_gpt_specs``) in place of the stock ones:

    decoder   get_c2r_decoder_block_spec (every MoE layer C2R'd, dense layers kept)
    MTP       get_gpt_mtp_block_spec over the C2R'd spec of the last decoder layer, so the
              multi-token-prediction layers route with C2R too (stock gpt_builder hands them the
              stock spec, which is also why the ``megatron_c2r.specs`` presets refuse MTP)

``c2r_model_provider`` wraps the checkout's ``model_provider`` so that a setting that would make
it build something else (``args.modelopt_enabled``, which Megatron-LM may set by itself after
parsing) stops the run with one line instead of silently dropping C2R.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_c2r import compat
from megatron_c2r.megatron_lm.arguments import c2r_options_from_args
from megatron_c2r.megatron_lm.preflight import refusal


def c2r_gpt_specs(
    config,
    options,
    *,
    use_transformer_engine: bool,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
):
    """``(decoder block spec, MTP block spec or None)`` for a C2R GPT model on this (virtual)
    pipeline stage. ``config``: the model's ``TransformerConfig`` (``mtp_num_layers`` decides
    the MTP block); ``options``: ``C2ROptions``. Pure spec construction (megatron.core only)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )

    from megatron_c2r.moe.spec_builders import apply_c2r_to_layer_spec, get_c2r_decoder_block_spec

    block_spec = get_c2r_decoder_block_spec(
        config,
        options,
        use_transformer_engine=use_transformer_engine,
        normalization=normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
    )
    if not getattr(config, "mtp_num_layers", None):
        return block_spec, None
    # The MTP block copies the model's last decoder layer (all layers' specs, not this stage's,
    # so a last stage without decoder layers still gets one), C2R'd like the decoder's.
    layer_specs = get_gpt_decoder_layer_specs(
        config, use_transformer_engine=use_transformer_engine, normalization=normalization,
        qk_l2_norm=qk_l2_norm,
    )  # fmt: skip
    last_layer = apply_c2r_to_layer_spec(layer_specs[-1], options)
    mtp_block_spec = get_gpt_mtp_block_spec(
        config, last_layer, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage
    )
    return block_spec, mtp_block_spec


def c2r_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Build an MCore ``GPTModel`` whose MoE layers (MTP layers included) use C2R (``args`` from
    Megatron-LM's parser plus our ``--c2r-*`` group). Raises ValueError (one line) for settings
    we cannot serve. Imports megatron.training (a Megatron-LM checkout)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training import print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    problem = refusal(args)
    if problem:
        raise ValueError(problem)
    if not getattr(args, "num_experts", None):
        raise ValueError("--num-experts is not set: megatron_c2r pretrains MoE models; add it")
    options = c2r_options_from_args(args)
    print_rank_0(f"building GPT model with megatron_c2r MoE layers ({options}) ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    block_spec, mtp_block_spec = c2r_gpt_specs(
        config,
        options,
        use_transformer_engine=args.transformer_impl == "transformer_engine",
        normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
        vp_stage=vp_stage,
    )
    kwargs = dict(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        mtp_block_spec=mtp_block_spec,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    return GPTModel(**compat.supported_kwargs(GPTModel, kwargs))


def c2r_model_provider(checkout_model_provider: Callable, get_args: Callable) -> Callable:
    """The ``model_provider`` for ``pretrain()``: the checkout's, with ``c2r_gpt_builder``.

    Checks ``refusal(get_args())`` first, on every rank at model-build time: the checkout's
    provider swaps in ModelOpt's builder whenever ``args.modelopt_enabled`` is set, and
    Megatron-LM's ``get_model`` sets it after parsing when ``--load`` holds a ModelOpt
    checkpoint, which the argv check in ``entry.main`` cannot see. Raises ValueError (one line).
    """

    def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                       pg_collection=None):  # fmt: skip
        problem = refusal(get_args())
        if problem:
            raise ValueError(problem)
        return checkout_model_provider(
            c2r_gpt_builder, pre_process, post_process, vp_stage,
            config=config, pg_collection=pg_collection,
        )  # fmt: skip

    return model_provider
