"""BigMac on CUDA with Transformer Engine's grouped experts (skipped without CUDA or TE): the
experts BigMac builds at width d are Megatron's TE experts unchanged. Identity projections at d = H
give the plain layer's outputs and gradients; at d < H the experts' weights are d wide.
Prepared on a CPU-only machine; not yet run on a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("megatron_world1")]

H, E, K = 256, 8, 2


def _layers(d):
    pytest.importorskip("transformer_engine")
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r import compat
    from megatron_c2r.moe.bigmac import low_dim_moe_spec
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import apply_c2r_to_moe_spec
    from megatron_c2r.routing.config import C2RRouterConfig
    from tests.megatron_cpu import moe_config

    config = moe_config(hidden_size=H, num_attention_heads=8, num_moe_experts=E, moe_router_topk=K,
                        moe_ffn_hidden_size=128, moe_grouped_gemm=True, bf16=True,
                        params_dtype=torch.bfloat16, moe_router_dtype="fp32",
                        use_cpu_initialization=False)  # fmt: skip
    stock = get_moe_module_spec(use_te=True, num_experts=E, moe_grouped_gemm=True)
    plain_spec = apply_c2r_to_moe_spec(stock, C2ROptions(router=C2RRouterConfig(mode="topk"),
                                                         hierarchy="flat"))  # fmt: skip
    torch.manual_seed(0)
    plain = compat.build_from_spec(plain_spec, config=config, layer_number=1).cuda().train()
    low = compat.build_from_spec(low_dim_moe_spec(plain_spec, dispatch_dim=d),
                                 config=config, layer_number=1).cuda().train()  # fmt: skip
    return plain, low


def test_te_grouped_experts_at_full_width_with_identity_projections_equal_the_plain_layer():
    plain, low = _layers(H)
    assert type(low.experts).__name__ == type(plain.experts).__name__
    low.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        eye = torch.eye(H, dtype=torch.bfloat16, device="cuda")
        low.dispatch_down.weight.copy_(eye)
        low.dispatch_up.weight.copy_(eye)
    x = torch.randn(64, 2, H, device="cuda", dtype=torch.bfloat16)
    outs = []
    for layer in (plain, low):
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.float().sum().backward()
        outs.append((out.detach(), xi.grad, layer.router.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_te_grouped_experts_are_built_at_width_d_and_train():
    _, low = _layers(64)
    # TE's grouped linears hold one weight per local expert: fc1 [F, d], fc2 [d, F]
    assert {tuple(p.shape) for p in low.experts.parameters()} == {(128, 64), (64, 128)}
    x = torch.randn(64, 2, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = low(x)
    out.float().sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    assert low.dispatch_down.weight.grad is not None and low.comm_stats.calls == 1
