"""Megatron-Bridge with our spec hook: ``spec_builders.c2r_transformer_layer_spec`` as a real
``megatron.bridge`` ``GPTModelProvider.transformer_layer_spec``; Bridge's ``provide()`` builds
the GPT/MoE model with our router and dedup MoE layer, which runs forward and backward on CPU
(one gloo rank).

Skipped, with the import error as the reason, where megatron-bridge does not import. It is not in
the ``test`` extra: 0.6.2 pins GPU-only dependencies (transformer-engine through
``megatron-core[dev,mlm]``, flashinfer, fast-hadamard-transform, nvidia-resiliency-ext), and its
``import megatron.bridge`` imports ``transformer_engine.pytorch`` unconditionally
(``megatron/bridge/peft/lora_layers.py``, reached from ``megatron/bridge/__init__.py`` through
``models`` -> ``conversion`` -> ``peft``), so it does not import on a machine without
transformer-engine. It runs where Bridge is installed (an NGC PyTorch image).
"""

import pytest
import torch

try:
    from megatron.bridge.models.gpt_provider import GPTModelProvider
except Exception as exc:  # noqa: BLE001 - whatever stops the import is the reason to skip
    pytest.skip(f"megatron-bridge is not importable: {type(exc).__name__}: {exc}",
                allow_module_level=True)

from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig

pytestmark = pytest.mark.usefixtures("megatron_world1")


def cpu_provider(options: C2ROptions) -> "GPTModelProvider":
    """A small MoE GPTModelProvider whose layer spec is our hook (local modules, CPU attention)."""
    from megatron_c2r.cpu.platform import cpu_block_spec
    from megatron_c2r.moe.spec_builders import c2r_transformer_layer_spec

    make_spec = c2r_transformer_layer_spec(options, use_transformer_engine=False)

    def layer_spec(config, vp_stage=None):  # Bridge passes vp_stage when the callable takes it
        return cpu_block_spec(make_spec(config, vp_stage=vp_stage))

    provider = GPTModelProvider(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, vocab_size=64, seq_length=16,
        position_embedding_type="learned_absolute", use_cpu_initialization=True,
        add_bias_linear=False, bf16=False, params_dtype=torch.float32, hidden_dropout=0.0,
        attention_dropout=0.0, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        cross_entropy_loss_fusion=False, apply_rope_fusion=False, bias_dropout_fusion=False,
        transformer_layer_spec=layer_spec,
    )  # fmt: skip
    provider.finalize()
    return provider


def test_bridge_gpt_provider_builds_our_moe_layers_and_runs_forward_and_backward_on_cpu():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_c2r.cpu.platform import setup_cpu_megatron
    from megatron_c2r.moe.layer import C2RMoELayer
    from megatron_c2r.moe.router import C2RRouter

    setup_cpu_megatron(0)
    options = C2ROptions(router=C2RRouterConfig(mode="group", num_groups=2, max_groups=1,
                                                warmup_steps=0), dispatcher="dedup")  # fmt: skip
    provider = cpu_provider(options)
    provider._pg_collection = ProcessGroupCollection.use_mpu_process_groups()  # what Bridge's
    model = provider.provide()  # provide_distributed_model sets before provide()
    layers = list(model.decoder.layers)
    assert all(isinstance(l.mlp, C2RMoELayer) and isinstance(l.mlp.router, C2RRouter) for l in layers)
    assert all(l.mlp.router.c2r_config.max_groups == 1 for l in layers)

    tokens = torch.randint(0, 64, (2, 16))
    position_ids = torch.arange(16).expand(2, -1)
    loss = model(tokens, position_ids, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for l in layers:  # gradients reach the router (through probs) and every expert that ran
        assert l.mlp.router.weight.grad is not None and l.mlp.router.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in l.mlp.experts.parameters())
        # anchored group routing with one group per token: every token stays in one of 2 groups
        assert l.mlp.router.c2r_metrics()["groups_per_token"] == 1.0
