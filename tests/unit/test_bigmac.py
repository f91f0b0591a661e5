"""BigMac low-dimensional dispatch (``megatron_c2r.moe.bigmac``) on real megatron.core MoE layers,
one process (EP = 1, gloo world of one).

Oracles: with d = H and identity projections the layer is the plain ``C2RMoELayer`` (and
Megatron's ``MoELayer`` for ``dispatcher="megatron"``) bit for bit, outputs and every gradient;
with d < H it is ``up(dense_moe_reference(down(x)))`` + shared experts, computed with the same
router in one process. Specs, state-dict and torch_dist round trips, and offline ``convert`` of
a BigMac checkpoint with a plan (d-wide experts relabelled, projections passed through).
"""

from __future__ import annotations

import functools
import os
import types
from unittest import mock

import pytest
import torch

from megatron_c2r.comm.reference import dense_moe_reference
from megatron_c2r.compat import moe_submodules, replace_moe_submodules
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config
from tests.sync_audit import SyncAudit

pytestmark = pytest.mark.usefixtures("megatron_world1")

H, E, K, FFN = 16, 8, 2, 8


def loop_gmm(a, b, batch_sizes, trans_b=False):
    """Test stand-in for grouped_gemm's ``ops.gmm`` (a CUDA kernel): one matmul per expert."""
    outs, start = [], 0
    for e, n in enumerate(batch_sizes.tolist()):
        outs.append(a[start : start + n] @ (b[e].t() if trans_b else b[e]))
        start += n
    return torch.cat(outs)


def grouped_gemm_on_cpu():
    # The legacy GroupedMLP (and this module) exist through 0.17; newer releases dropped them.
    grouped_gemm_util = pytest.importorskip("megatron.core.transformer.moe.grouped_gemm_util")

    stack = mock.patch.multiple(
        grouped_gemm_util, assert_grouped_gemm_is_available=lambda: None,
        ops=types.SimpleNamespace(gmm=loop_gmm),
    )  # fmt: skip
    return stack


def spec_and_config(grouped=False, router=None, **overrides):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r.moe.router import C2RRouter

    init_parallel(ep=1)
    base = dict(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E, moe_router_topk=K,
                moe_grouped_gemm=grouped, moe_aux_loss_coeff=0.01)  # fmt: skip
    config = moe_config(**{**base, **overrides})
    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=grouped)
    c2r = router or C2RRouterConfig(mode="group", max_groups=2, num_groups=4)
    spec = replace_moe_submodules(spec, router=functools.partial(C2RRouter, c2r_config=c2r))
    return spec, config


def plain_and_identity(grouped=False, dispatcher="dedup", **overrides):
    """A plain layer and a BigMac one at d = H with identity projections and the plain layer's
    weights (router, experts, shared experts)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r.moe.bigmac import LowDimMoELayer
    from megatron_c2r.moe.layer import C2RMoELayer

    spec, config = spec_and_config(grouped, **overrides)
    torch.manual_seed(0)
    if dispatcher == "megatron":
        plain = MoELayer(config, moe_submodules(spec))
    else:
        plain = C2RMoELayer(config, moe_submodules(spec), dispatcher="dedup")
    low = LowDimMoELayer(config, moe_submodules(spec), dispatcher=dispatcher, dispatch_dim=H)
    result = low.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["dispatch_down.weight", "dispatch_up.weight"]
    assert result.unexpected_keys == []
    with torch.no_grad():
        low.dispatch_down.weight.copy_(torch.eye(H))
        low.dispatch_up.weight.copy_(torch.eye(H))
    for layer in (plain, low):
        layer.set_layer_number(1)
        layer.train()
    return plain, low


def forward_backward(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 2, H, generator=g).requires_grad_()
    grad = torch.randn(12, 2, H, generator=g)
    out, _ = layer(x)
    (out * grad).sum().backward()
    return dict(out=out.detach(), x=x.grad, router=layer.router.weight.grad,
                experts=[p.grad for p in layer.experts.parameters()],
                shared=[p.grad for p in layer.shared_experts.parameters()]
                if layer.shared_experts is not None else [])  # fmt: skip


CASES = {
    "sequential": dict(),
    "sequential_shared_experts": dict(moe_shared_expert_intermediate_size=12),
    "sequential_capacity_dropping": dict(moe_expert_capacity_factor=0.5),
    # GroupedMLP asserts config.bf16 (its kernel's dtype); the weights stay fp32 here.
    "grouped_gemm": dict(grouped=True, bf16=True),
    "megatron_dispatcher": dict(dispatcher="megatron"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_projections_at_full_width_equal_the_plain_layer_bit_for_bit(case):
    kwargs = CASES[case]
    grouped = kwargs.get("grouped", False)
    with megatron_cpu(), (grouped_gemm_on_cpu() if grouped else mock.patch.dict({})):
        plain, low = plain_and_identity(**kwargs)
        want, got = forward_backward(plain), forward_backward(low)
    for key in ("out", "x", "router"):
        assert torch.equal(got[key], want[key]), key
    for key in ("experts", "shared"):
        assert len(got[key]) == len(want[key])
        assert all(torch.equal(a, b) for a, b in zip(got[key], want[key])), key
    assert low.dispatch_down.weight.grad is not None and low.dispatch_up.weight.grad is not None


def low_dim_layer(d, ffn=12, grouped=False, **overrides):
    from megatron_c2r.moe.bigmac import LowDimMoELayer

    spec, config = spec_and_config(grouped, **overrides)
    torch.manual_seed(0)
    layer = LowDimMoELayer(config, moe_submodules(spec), dispatch_dim=d, dispatch_ffn_hidden_size=ffn)
    g = torch.Generator().manual_seed(7)
    for p in layer.experts.parameters():  # away from the tiny init, so errors would show
        p.data = torch.randn(p.shape, generator=g) * 0.5
    layer.set_layer_number(1)
    return layer.train()


@pytest.mark.parametrize("d", [4, 8])
def test_low_dim_layer_equals_the_projected_dense_reference(d):
    """out = up(sum_e probs[t, e] expert_e(down(x[t]))) + shared(x), grads through autograd of
    that one-process loop: the router scores the full-width token, the experts see d."""
    layer = low_dim_layer(d, moe_shared_expert_intermediate_size=12)
    experts = [lambda h, m=m: m(h)[0] for m in layer.experts.local_experts]
    assert all(m.linear_fc1.weight.shape[1] == d for m in layer.experts.local_experts)
    assert layer.router.weight.shape == (E, H) and layer.shared_experts.config.hidden_size == H
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 2, H, generator=g)
    grad = torch.randn(12, 2, H, generator=g)
    params = [layer.router.weight, layer.dispatch_down.weight, layer.dispatch_up.weight,
              *layer.experts.parameters()]  # fmt: skip

    x1 = x.clone().requires_grad_()
    out, _ = layer(x1)
    got = torch.autograd.grad((out * grad).sum(), [x1, *params])

    x2 = x.clone().requires_grad_()
    probs, routing_map = layer.router(x2)
    low_TZ = layer.dispatch_down(x2).view(-1, d)
    ref = layer.dispatch_up(dense_moe_reference(low_TZ, routing_map, probs, experts)).view_as(x2)
    ref = ref + layer.shared_experts(x2)
    want = torch.autograd.grad((ref * grad).sum(), [x2, *params])
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-5


def test_grouped_gemm_experts_at_d_equal_sequential_experts_with_the_same_weights():
    """GroupedMLP stores all experts in two [H, E*F]-style matrices; at d it is built from the
    same config copy and computes what SequentialMLP computes from the same per-expert weights."""
    with grouped_gemm_on_cpu():
        grouped = low_dim_layer(4, ffn=6, grouped=True, bf16=True)  # GroupedMLP asserts bf16
        seq = low_dim_layer(4, ffn=6)
        seq.load_state_dict({k: v for k, v in grouped.state_dict().items() if "experts" not in k},
                            strict=False)  # fmt: skip
        w1 = grouped.experts.weight1.view(E, 4, 6)  # GroupedMLP.forward's views
        w2 = grouped.experts.weight2.view(E, 6, 4)
        with torch.no_grad():
            for e, m in enumerate(seq.experts.local_experts):
                m.linear_fc1.weight.copy_(w1[e].t())
                m.linear_fc2.weight.copy_(w2[e].t())
        x = torch.randn(12, 2, H, generator=torch.Generator().manual_seed(5))
        a, b = grouped(x)[0], seq(x)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_layer_adds_no_host_sync_to_the_dedup_path():
    layer = low_dim_layer(4)
    x = torch.randn(16, 2, H, requires_grad=True)
    audit = SyncAudit().track(layer, x)
    with audit:
        out, _ = layer(x)
        audit.phase = "backward"
        out.sum().backward()
    assert audit.events == [("forward", "Tensor.cpu")], audit.summary()  # the count table


def test_bad_sizes_fail_in_one_line_naming_the_field_before_anything_is_built():
    from megatron_c2r.moe.bigmac import LowDimMoELayer

    spec, config = spec_and_config()
    cases = [
        (dict(dispatch_dim=H + 1), "c2r.dispatch_dim=17 must be an int in [1, hidden_size=16]"),
        (dict(dispatch_dim=0), "c2r.dispatch_dim=0"),
        (dict(dispatch_dim=None), "c2r.dispatch_dim=None"),
        (dict(dispatch_dim=4, dispatch_ffn_hidden_size=0), "c2r.dispatch_ffn_hidden_size=0"),
    ]
    built = []
    with mock.patch("megatron_c2r.compat.build_from_spec", side_effect=built.append):
        for kwargs, message in cases:
            with pytest.raises(ValueError) as info:
                LowDimMoELayer(config, moe_submodules(spec), **kwargs)
            assert message in str(info.value) and "\n" not in str(info.value)
        for field, value, message in [
            ("moe_latent_size", 4, "unset moe_latent_size"),
            ("moe_shared_expert_overlap", True, "set moe_shared_expert_overlap=False"),
        ]:
            with mock.patch.object(config, field, value), pytest.raises(ValueError, match=message):
                LowDimMoELayer(config, moe_submodules(spec), dispatch_dim=4)
    assert built == []


# ----------------------------------------------------------------------------------------------
# Specs, state dicts, checkpoints
# ----------------------------------------------------------------------------------------------
def bigmac_gpt(seed, d=8, ffn=12, dispatcher="dedup"):
    """A 2-layer GPTModel whose MoE layers are BigMac ones, through the spec builders."""
    from megatron.core.models.gpt import GPTModel

    from megatron_c2r import compat
    from megatron_c2r.moe.bigmac import low_dim_moe_spec
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    init_parallel(ep=1)
    config = moe_config(num_layers=2, hidden_size=H, num_moe_experts=E, moe_router_topk=K)
    options = C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1), dispatcher=dispatcher)
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    for i, layer in enumerate(block.layer_specs):
        mlp = low_dim_moe_spec(compat.layer_submodules(layer).mlp, dispatch_dim=d,
                               dispatch_ffn_hidden_size=ffn)  # fmt: skip
        block.layer_specs[i] = compat.replace_layer_submodules(layer, mlp=mlp)
    torch.manual_seed(seed)
    with megatron_cpu():
        model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=64,
                         max_sequence_length=16)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for layer in model.decoder.layers:
        for p in layer.mlp.experts.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model


def moe_outputs(model):
    x = torch.randn(10, 2, H, generator=torch.Generator().manual_seed(99))
    return [layer.mlp(x)[0].detach() for layer in model.decoder.layers]


def test_the_spec_builds_bigmac_layers_that_keep_the_c2r_dispatcher_or_megatrons():
    from megatron_c2r.moe.bigmac import LowDimMoELayer, low_dim_moe_spec

    for dispatcher, name in [("dedup", "DedupAlltoAllTokenDispatcher"),
                             ("megatron", "MoEAlltoAllTokenDispatcher")]:  # fmt: skip
        model = bigmac_gpt(seed=1, d=4, ffn=6, dispatcher=dispatcher)
        for layer in model.decoder.layers:
            assert type(layer.mlp) is LowDimMoELayer and layer.mlp.dispatcher == dispatcher
            assert type(layer.mlp.token_dispatcher).__name__ == name
            assert layer.mlp.experts.local_experts[0].linear_fc1.weight.shape == (6, 4)
            assert layer.mlp.dispatch_down.weight.shape == (4, H)
    with pytest.raises(ValueError, match="needs an MoELayer spec"):
        from megatron.core.transformer.mlp import MLP
        from megatron.core.transformer.spec_utils import ModuleSpec

        low_dim_moe_spec(ModuleSpec(module=MLP), dispatch_dim=4)


def test_state_dict_round_trip_restores_the_projections_and_the_d_wide_experts():
    src, dst = bigmac_gpt(seed=1), bigmac_gpt(seed=2)
    want = moe_outputs(src)
    assert any(not torch.equal(a, b) for a, b in zip(want, moe_outputs(dst)))
    state = src.state_dict()
    assert state["decoder.layers.0.mlp.dispatch_down.weight"].shape == (8, H)
    assert state["decoder.layers.1.mlp.dispatch_up.weight"].shape == (H, 8)
    dst.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(want, moe_outputs(dst)))


def _torch_dist_round_trip_and_convert(tmp):
    """torch_dist save of a BigMac GPT, load into a fresh model; then convert with a plan and
    load the converted checkpoint: same MoE outputs, projections untouched, experts relabelled."""
    from megatron.core import dist_checkpointing

    from megatron_c2r import compat
    from megatron_c2r.placement.checkpoint import convert_checkpoint
    from megatron_c2r.placement.plan_file import Plan, PlanLayer

    out = {}
    src = bigmac_gpt(seed=1)
    want = moe_outputs(src)
    sharded = src.sharded_state_dict()
    out["keys"] = sorted(k for k in sharded if "dispatch_" in k)
    ckpt = os.path.join(tmp, "ckpt")
    os.makedirs(ckpt)
    compat.save_dist_checkpoint(sharded, ckpt)
    fresh = bigmac_gpt(seed=2)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt))
    out["loaded_err"] = max(float((a - b).abs().max()) for a, b in zip(moe_outputs(fresh), want))

    orders = [[5, 2, 7, 0, 1, 6, 3, 4], [1, 0, 3, 2, 5, 4, 7, 6]]
    layers = [PlanLayer(i, [o[:4], o[4:]], [0 if e in o[:4] else 1 for e in range(E)], {})
              for i, o in enumerate(orders)]  # fmt: skip
    convert_checkpoint(ckpt, Plan(num_experts=E, ep_size=2, top_k=K, layers=layers),
                       os.path.join(tmp, "converted"))  # fmt: skip
    relabelled = bigmac_gpt(seed=3)
    state = dist_checkpointing.load(relabelled.sharded_state_dict(), os.path.join(tmp, "converted"))
    relabelled.load_state_dict(state)
    out["converted_err"] = max(
        float((a - b).abs().max()) for a, b in zip(moe_outputs(relabelled), want)
    )
    out["scale"] = max(float(w.abs().max()) for w in want)
    a, b = src.decoder.layers[0].mlp, relabelled.decoder.layers[0].mlp
    out["down_equal"] = bool(torch.equal(a.dispatch_down.weight, b.dispatch_down.weight))
    fc1 = lambda m, e: m.experts.local_experts[e].linear_fc1.weight  # noqa: E731
    out["expert_moved"] = all(torch.equal(fc1(b, i), fc1(a, o)) for i, o in enumerate(orders[0]))
    return out


def test_torch_dist_checkpoint_round_trip_and_offline_convert_keep_bigmac_outputs(
    dist_pool, tmp_path
):
    (r,) = dist_pool(1).run(_torch_dist_round_trip_and_convert, str(tmp_path))
    assert r["keys"] == [f"decoder.layers.{i}.mlp.dispatch_{w}.weight"
                         for i in (0, 1) for w in ("down", "up")]  # fmt: skip
    assert r["loaded_err"] == 0.0
    assert r["converted_err"] <= 1e-6 * max(1.0, r["scale"])
    assert r["down_equal"] and r["expert_moved"]


# ----------------------------------------------------------------------------------------------
# The c2r: keys and --c2r-* flags (C2ROptions.dispatch_dim / dispatch_ffn_hidden_size)
# ----------------------------------------------------------------------------------------------
def test_c2r_dispatch_dim_goes_from_yaml_through_the_flags_to_bigmac_layers(tmp_path):
    import argparse

    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.megatron_lm.arguments import add_c2r_args, c2r_options_from_args
    from megatron_c2r.moe.bigmac import LowDimMoELayer
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.run_config import load_config

    path = tmp_path / "a.yaml"
    path.write_text(
        "megatron: {--num-layers: 1, --hidden-size: 16, --num-attention-heads: 4, "
        "--seq-length: 8, --max-position-embeddings: 8, --micro-batch-size: 1, "
        "--global-batch-size: 2, --train-iters: 1, --num-experts: 8, --moe-router-topk: 2, "
        "--expert-model-parallel-size: 2}\n"
        "launch: {nodes: 1, gpus_per_node: 2}\n"
        "c2r: {dispatch_dim: 4, dispatch_ffn_hidden_size: 6}\n"
    )
    cfg = load_config(str(path))
    assert (cfg.c2r.dispatch_dim, cfg.c2r.dispatch_ffn_hidden_size) == (4, 6)
    argv = cfg.c2r_argv()
    assert argv[argv.index("--c2r-dispatch-dim") + 1] == "4"
    args = add_c2r_args(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv)
    options = c2r_options_from_args(args)
    assert options == cfg.c2r
    assert "--c2r-dispatch-dim" not in _argv_of(C2ROptions())  # unset: no flag written

    init_parallel(ep=1)
    config = moe_config(num_layers=1, hidden_size=H, num_moe_experts=E, moe_router_topk=K)
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    layer = build_from_spec(block.layer_specs[0].submodules.mlp, config=config, layer_number=1)
    assert type(layer) is LowDimMoELayer and layer.dispatch_dim == 4
    assert layer.experts.local_experts[0].linear_fc1.weight.shape == (6, 4)


def _argv_of(options):
    from megatron_c2r.megatron_lm.flags import c2r_argv

    return c2r_argv(options)


def test_dispatch_options_are_checked_in_one_line():
    from megatron_c2r.moe.options import C2ROptions

    with pytest.raises(ValueError, match=r"^c2r.dispatch_dim=0 must be >= 1 \(or unset\)$"):
        C2ROptions(dispatch_dim=0)
    with pytest.raises(ValueError, match="set c2r.dispatch_dim or remove it"):
        C2ROptions(dispatch_ffn_hidden_size=64)
