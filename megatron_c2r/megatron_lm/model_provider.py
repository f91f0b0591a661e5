"""The GPT model builder our Megatron-LM entry point hands to the checkout's ``model_provider``.

``model_provider(model_builder, pre_process, post_process, vp_stage, config, pg_collection)`` is
stable from core_v0.16 through 0.20 and calls ``model_builder(args, pre_process, post_process,
vp_stage, config=..., pg_collection=...)``; ``c2r_gpt_builder`` is such a builder. It does what
Megatron-LM's ``gpt_builder`` does for an MCore MoE GPT, with our block spec in place of
``get_gpt_decoder_block_spec`` (and for the MTP block, the C2R'd last decoder layer).
"""

from __future__ import annotations

from megatron_c2r import compat
from megatron_c2r.megatron_lm.arguments import c2r_options_from_args


def c2r_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Build an MCore ``GPTModel`` whose MoE layers use C2R (``args`` from Megatron-LM's parser
    plus our ``--c2r-*`` group). Raises ValueError (one line) for settings we cannot serve."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.training import print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    for flag, value in (
        ("--use-legacy-models", getattr(args, "use_legacy_models", False)),
        ("--yaml-cfg", getattr(args, "yaml_cfg", None)),
        ("--spec", getattr(args, "spec", None)),
    ):
        if value:
            raise ValueError(f"{flag}={value!r} is not supported by megatron_c2r: remove it")
    if not getattr(args, "num_experts", None):
        raise ValueError("--num-experts is not set: megatron_c2r pretrains MoE models; add it")
    options = c2r_options_from_args(args)
    print_rank_0(f"building GPT model with megatron_c2r MoE layers ({options}) ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    block_spec = get_c2r_decoder_block_spec(
        config,
        options,
        use_transformer_engine=use_te,
        normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
        vp_stage=vp_stage,
    )
    mtp_block_spec = None
    if getattr(args, "mtp_num_layers", None):
        last_layer = _last_decoder_layer_spec(config, use_te, args, options)
        mtp_block_spec = get_gpt_mtp_block_spec(
            config, last_layer, use_transformer_engine=use_te, vp_stage=vp_stage
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


def _last_decoder_layer_spec(config, use_te, args, options):
    """The C2R'd spec of the model's last decoder layer (what the MTP block copies)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    from megatron_c2r.moe.spec_builders import apply_c2r_to_layer_spec

    layer_specs = get_gpt_decoder_layer_specs(
        config, use_transformer_engine=use_te, normalization=args.normalization,
        qk_l2_norm=args.qk_l2_norm,
    )  # fmt: skip
    return apply_c2r_to_layer_spec(layer_specs[-1], options)
