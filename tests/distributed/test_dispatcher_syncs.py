"""The host-sync budget at EP=2 on real gloo process groups (issue 14 part 5): our flat dedup
layer makes exactly one blocking sync per forward (the count-table copy) and none in the router
or backward; Megatron's alltoall layer is measured the same way for reference; a non-finite
router on one rank makes every EP rank raise the same one-line error after the count exchange.
The counter and the EP=1 cases are in ``tests/unit/test_host_syncs.py``."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config
from tests.sync_audit import SyncAudit, megatron_alltoall_dtoh, megatron_permute_syncs

H = 32


def _layer(dispatcher: str, ep: int):
    """C2RMoELayer with C2RRouter (ours), or Megatron's MoELayer with TopKRouter (reference)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r.compat import build_from_spec, moe_submodules
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=ep)
    torch.manual_seed(0)
    config = moe_config(num_layers=1, hidden_size=H, num_moe_experts=8, moe_router_topk=2)
    if dispatcher == "megatron":
        with megatron_cpu():
            spec = get_moe_module_spec(use_te=False, num_experts=8)
            layer = MoELayer(config, moe_submodules(spec))
    else:
        options = C2ROptions(router=C2RRouterConfig(mode="topk"))
        block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
        layer = build_from_spec(block.layer_specs[0].submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer.train()


def _audit(dispatcher: str, ep: int) -> dict:
    from megatron.core.transformer.moe import token_dispatcher

    layer = _layer(dispatcher, ep)
    audit = SyncAudit()
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(12, 2, H, generator=g, requires_grad=True)
    audit.track(layer, x)
    layer.router.register_forward_pre_hook(lambda *a: setattr(audit, "phase", "router"))
    layer.router.register_forward_hook(lambda *a: setattr(audit, "phase", "forward"))
    with contextlib.ExitStack() as stack:
        if dispatcher == "megatron":
            stack.enter_context(megatron_cpu())
            stack.enter_context(
                mock.patch.object(
                    token_dispatcher.MoEAlltoAllTokenDispatcher,
                    "_maybe_dtoh_and_synchronize",
                    megatron_alltoall_dtoh(audit),
                )
            )
        with audit:
            out, _ = layer(x)
            audit.phase = "backward"
            out.sum().backward()
    return audit.summary()


@pytest.mark.world_size(2)
def test_our_layer_makes_one_host_sync_per_forward_at_ep2(dist_pool):
    for rank, summary in enumerate(dist_pool(2).run(_audit, "dedup", 2)):
        assert summary == {"forward": {"Tensor.cpu": 1}}, f"rank {rank}: {summary}"


@pytest.mark.world_size(2)
def test_megatron_alltoall_for_reference_at_ep2(dist_pool):
    # One wait for the split sizes, plus the syncs of its unfused permute (the path without TE;
    # TE's fused permute has none): 2 masked_selects on 0.16 (3 where ours makes 1), none on 0.19.
    want = {**megatron_permute_syncs(), "Event.synchronize (Megatron's cuda_sync_point)": 1}
    for rank, summary in enumerate(dist_pool(2).run(_audit, "megatron", 2)):
        assert summary == {"forward": want}, f"rank {rank}: {summary}"


def _nan_logits_on_rank1():
    layer = _layer("dedup", 2)
    if dist.get_rank() == 1:
        with torch.no_grad():
            layer.router.weight[3, 0] = float("nan")
    try:
        layer(torch.randn(6, 1, H))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.world_size(2)
def test_nonfinite_logits_on_one_rank_raise_the_same_error_on_every_ep_rank(dist_pool):
    messages = dist_pool(2).run(_nan_logits_on_rank1)
    assert messages[0] is not None and messages[0] == messages[1]
    assert "layer 1" in messages[0] and "EP rank(s) [1]" in messages[0]
    assert "c2r.check_finite_logits" in messages[0] and "\n" not in messages[0]
