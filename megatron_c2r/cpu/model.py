"""Build the CPU main job's GPTModel: Megatron's own GPTModel and block spec, with our router and
dispatcher injected through the spec (the same builder the cluster path uses) and the attention
swap from ``cpu.platform``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_c2r.cpu.job_config import CPUTrainConfig
from megatron_c2r.cpu.data import PADDED_VOCAB_SIZE
from megatron_c2r.cpu.platform import cpu_block_spec


def transformer_config(cfg: CPUTrainConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        expert_model_parallel_size=cfg.ep_size,
        moe_router_load_balancing_type=cfg.load_balancing_type,
        moe_aux_loss_coeff=cfg.aux_loss_coeff,
        moe_router_score_function=cfg.score_function,
        moe_router_num_groups=cfg.router_num_groups,
        moe_router_group_topk=cfg.router_group_topk,
        moe_router_pre_softmax=cfg.router_pre_softmax,
        moe_router_topk_scaling_factor=cfg.router_topk_scaling_factor,
        moe_router_enable_expert_bias=cfg.router_enable_expert_bias,
        moe_router_bias_update_rate=cfg.router_bias_update_rate,
        moe_z_loss_coeff=cfg.z_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=cfg.grouped_gemm,
        normalization=cfg.normalization,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        init_method_std=cfg.init_method_std,
        hidden_dropout=0.0,  # CPU runner: no dropout RNG streams (see cpu.platform)
        attention_dropout=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        bf16=False,
        params_dtype=torch.float32,
    )


def cpu_options(cfg: CPUTrainConfig):
    """The C2R options the CPU model is built with: the config's, except for the baseline
    (``c2r.enabled: false``), which routes plain top-k (``trainer.BASELINE_LINE`` says why)."""
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.routing.config import C2RRouterConfig

    if cfg.c2r.enabled:
        return cfg.c2r
    return C2ROptions(router=C2RRouterConfig(mode="topk", warmup_steps=0), dispatcher="dedup")


def build_model(cfg: CPUTrainConfig, seed: int):
    """GPTModel with C2R MoE layers on CPU. Dense weights are identical on every rank (same
    seed); each expert is then re-initialised from a seed of its *global* id, so expert e starts
    from the same weights whatever EP size or placement the run uses."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    config = transformer_config(cfg)
    torch.manual_seed(seed)
    spec = get_c2r_decoder_block_spec(
        config, cpu_options(cfg), use_transformer_engine=False, normalization=cfg.normalization
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=cpu_block_spec(spec),
        vocab_size=PADDED_VOCAB_SIZE,
        max_sequence_length=cfg.max_position_embeddings or cfg.seq_length,
        position_embedding_type="learned_absolute",  # RoPE moves its buffers to CUDA in 0.16
        share_embeddings_and_output_weights=not cfg.untie_embeddings,
    )
    _reinit_experts(model, config, seed, ps.get_expert_model_parallel_rank())
    return model


@torch.no_grad()
def _reinit_experts(model, config, seed: int, ep_rank: int) -> None:
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not hasattr(experts, "local_experts"):
            continue
        n_local = len(experts.local_experts)
        for i, expert in enumerate(experts.local_experts):
            gen = torch.Generator().manual_seed(seed * 100_003 + layer.layer_number * 1009 + ep_rank * n_local + i)
            for name, param in expert.named_parameters():
                std = config.init_method_std
                if "linear_fc2" in name:  # Megatron's scaled init for output projections
                    std = std / (2.0 * config.num_layers) ** 0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def expert_parameter(name: str) -> bool:
    """Expert weights live on one EP rank each (no data-parallel all-reduce across EP)."""
    return ".experts." in name
