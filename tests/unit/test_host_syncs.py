"""The host-sync budget of one MoE layer (issue 14 part 5), counted on CPU with ``SyncAudit``.

Budget: at most one blocking host sync per layer forward with our flat dedup dispatcher (the copy
of the exchanged count table), none in the router, none in backward, none in the metrics while
recording; Megatron's alltoall dispatcher is measured the same way for reference (it waits once,
at its ``cuda_sync_point``). EP=1 here (the local path); EP=2 on gloo is in
``tests/distributed/test_dispatcher_syncs.py``.
"""

import contextlib
from unittest import mock

import pytest
import torch

from megatron_c2r.metrics.report import C2RMetrics
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config
from tests.sync_audit import SyncAudit, megatron_alltoall_dtoh, megatron_permute_syncs

pytestmark = pytest.mark.usefixtures("megatron_world1")
TOLIST = torch.Tensor.tolist


# ----------------------------------------------------------------------------------------------
# The counter itself: it must see what blocks on a GPU and nothing that does not
# ----------------------------------------------------------------------------------------------
def test_the_audit_counts_device_reads_and_data_dependent_shapes_but_not_host_work():
    x = torch.tensor([0, 3, 0, 5])
    host = torch.tensor([1, 2, 3])  # built from Python data: a host tensor, reading it is free
    audit = SyncAudit().track(x)
    with audit:
        mask = x > 0
        _ = mask.nonzero()
        _ = x[mask]
        y = x.clone()
        y[mask] = torch.tensor([7, 8])  # torch >= 2.15 runs `y[mask] = 0` as masked_fill_ (no sync)
        _ = x.sum().item()
        _ = bool(x.any())
        _ = x.tolist()
        _ = torch.bincount(x, minlength=8)
        _ = torch.repeat_interleave(x.clamp(max=2))
        copy = x.cpu()
        # Not syncs: host-known sizes, host tensors, reading a host copy.
        _ = torch.nonzero_static(mask, size=2)
        _ = torch.repeat_interleave(x.clamp(max=2), output_size=4)
        _ = host.tolist(), int(host.sum()), copy.tolist()
        _ = torch.arange(4, device=x.device) * 2
    ops = [op for _, op in audit.events]
    assert ops == [
        "nonzero",
        "index with a boolean mask",
        "index_put_ with a boolean mask",
        "_local_scalar_dense",
        "_local_scalar_dense",
        "Tensor.tolist",
        "bincount",
        "repeat_interleave without output_size",
        "Tensor.cpu",
    ], ops
    assert torch.Tensor.tolist is TOLIST  # the wrappers are gone after the block


# ----------------------------------------------------------------------------------------------
# One MoE layer, EP = 1
# ----------------------------------------------------------------------------------------------
H = 32


def c2r_layer(dispatcher="dedup", **router):
    """A C2RMoELayer from our spec builder with a C2RRouter (default: group mode, one group per
    token), aux loss on."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    init_parallel()
    torch.manual_seed(0)
    config = moe_config(
        num_layers=1, hidden_size=H, num_moe_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.01
    )
    router = router or dict(mode="group", max_groups=1)
    options = C2ROptions(router=C2RRouterConfig(**router), dispatcher=dispatcher)
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    layer = build_from_spec(block.layer_specs[0].submodules.mlp, config=config, layer_number=1)
    layer.set_layer_number(1)
    return layer.train()


def megatron_layer():
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r.compat import moe_submodules

    init_parallel()
    torch.manual_seed(0)
    config = moe_config(num_layers=1, hidden_size=H, num_moe_experts=8, moe_router_topk=2)
    with megatron_cpu():
        layer = MoELayer(config, moe_submodules(get_moe_module_spec(use_te=False, num_experts=8)))
    layer.set_layer_number(1)
    return layer.train()


def audit_forward_backward(layer, audit=None, context=contextlib.nullcontext, padded=False):
    """One forward+backward of ``layer`` under a SyncAudit; phases: router, forward (the rest
    of the layer), backward. ``context(audit)`` wraps the run (e.g. Megatron's CPU patches);
    ``padded``: the last 3 tokens of each sequence are padding."""
    audit = audit or SyncAudit()
    x = torch.randn(16, 2, H, requires_grad=True)
    grad = torch.randn(16, 2, H)
    padding = torch.zeros(2, 16, dtype=torch.bool)  # [B, S], as Megatron's layers take it
    padding[:, -3:] = True
    kwargs = dict(padding_mask=padding) if padded else {}
    audit.track(layer, x, grad, padding)
    handles = [
        layer.router.register_forward_pre_hook(lambda *a: setattr(audit, "phase", "router")),
        layer.router.register_forward_hook(lambda *a: setattr(audit, "phase", "forward")),
    ]
    try:
        with context(audit), audit:
            out, _ = layer(x, **kwargs)
            audit.phase = "backward"
            (out * grad).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return audit


ROUTERS = [
    dict(mode="group", max_groups=1),
    dict(mode="group", max_groups=2, group_selection="group_score", num_groups=4),
    dict(mode="topk", penalty_coeff=0.01),
    dict(mode="c2r", top_t=3, warmup_steps=2, penalty_coeff=0.01),
]


# Padding and the collaboration tracker are where router syncs hid (the tracker's padded-token
# count was read on the host until it became a device tensor): both on and off here.
INPUTS = [
    pytest.param(False, True, id="tracked"),
    pytest.param(True, False, id="padded-untracked"),
    pytest.param(True, True, id="padded-tracked"),
]


@pytest.mark.parametrize("padded,tracked", INPUTS)
@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: "-".join(f"{v}" for v in r.values()))
def test_our_layer_makes_one_host_sync_per_forward_none_in_router_and_backward(
    router, padded, tracked
):
    layer = c2r_layer(track_collaboration=tracked, **router)
    assert layer.router.defer_finite_check
    assert layer.token_dispatcher.finite_check_router is layer.router
    audit = audit_forward_backward(layer, padded=padded)
    summary = audit.summary()
    assert audit.count("router") == 0, summary
    assert audit.count("backward") == 0, summary
    assert audit.events == [("forward", "Tensor.cpu")], summary  # the count-table copy


def test_metrics_add_no_sync_while_recording_and_one_per_report():
    layer = c2r_layer()
    metrics = C2RMetrics(num_layers=1).attach(layer)
    try:
        audit = audit_forward_backward(layer)
        assert audit.events == [("forward", "Tensor.cpu")], audit.summary()
        report = SyncAudit().track(layer, *_metric_tensors(metrics))
        with report:
            metrics.record(layer)
            assert report.events == []
            values = metrics.compute()
        assert [op for _, op in report.events] == ["Tensor.cpu"]
        assert values["moe/c2r/ranks_per_token"] == 1.0
        assert values["moe/c2r/groups_per_token"] == 1.0
    finally:
        metrics.detach()


def _metric_tensors(metrics):
    sums = [v for per_layer in metrics._sums.values() for v in per_layer.values()]
    return [v for v in sums if isinstance(v, torch.Tensor)]


def test_megatron_alltoall_layer_for_reference_waits_once_plus_its_permutes_syncs():
    """Megatron's alltoall waits once for its split sizes (event sync at ``cuda_sync_point``);
    its unfused ``permute`` (``moe_permute_fusion=False``, the only path without TE) adds two
    ``masked_select`` syncs on 0.16 and none on 0.19 (argsort). With TE's fused permute there are
    none either: one sync per forward."""
    from megatron.core.transformer.moe import token_dispatcher

    @contextlib.contextmanager
    def on_cpu(audit):
        stand_in = megatron_alltoall_dtoh(audit)
        cls = token_dispatcher.MoEAlltoAllTokenDispatcher
        with megatron_cpu(), mock.patch.object(cls, "_maybe_dtoh_and_synchronize", stand_in):
            yield

    permute_syncs = megatron_permute_syncs()  # sorted token indices and permuted probs
    assert permute_syncs in ({"masked_select": 2}, {}), permute_syncs  # 0.16 / 0.19
    audit = audit_forward_backward(megatron_layer(), context=on_cpu)
    assert audit.summary() == {
        "forward": {**permute_syncs, "Event.synchronize (Megatron's cuda_sync_point)": 1}
    }, audit.summary()  # nothing in its router (TopKRouter), nothing in backward


def test_nonfinite_router_logits_raise_the_routers_error_from_the_count_exchange():
    layer = c2r_layer()
    with torch.no_grad():
        layer.router.weight[0, 0] = float("nan")
    with pytest.raises(ValueError) as err:
        layer(torch.randn(4, 1, H))
    message = str(err.value)
    assert "layer 1" in message and "NaN/Inf" in message and "c2r.check_finite_logits" in message
    assert "EP rank(s) [0]" in message and "\n" not in message


STAGES = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
          "token_combine", "combine_postprocess")  # fmt: skip


def test_the_one_sync_sits_in_token_dispatch_where_megatrons_alltoall_waits_not_in_preprocess():
    """--overlap-moe-expert-parallel-comm runs dispatch_preprocess inside the attention node,
    before the other micro-batch's MLP backward is queued: a wait there is a GPU bubble per
    layer. Megatron's alltoall waits at the EP all-to-all (token_dispatch, the dispatch node)."""
    layer = c2r_layer()
    dispatcher, audit = layer.token_dispatcher, SyncAudit()

    def in_phase(name):
        stage = getattr(dispatcher, name)

        def run(*args, **kwargs):
            previous, audit.phase = audit.phase, name
            try:
                return stage(*args, **kwargs)
            finally:
                audit.phase = previous

        return run

    with contextlib.ExitStack() as stack:
        for name in STAGES:
            stack.enter_context(mock.patch.object(dispatcher, name, in_phase(name)))
        audit_forward_backward(layer, audit)
    assert [e for e in audit.events if e[0] in STAGES] == [("token_dispatch", "Tensor.cpu")], audit.summary()
    assert audit.count("dispatch_preprocess") == 0


# ----------------------------------------------------------------------------------------------
# Statistics only where they are used (issue 22 item 6)
# ----------------------------------------------------------------------------------------------
def _counting_calls(obj, name):
    calls, original = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    return calls, mock.patch.object(obj, name, counted)


def test_router_statistics_run_only_on_iterations_the_metrics_record():
    layer = c2r_layer()
    metrics = C2RMetrics(num_layers=1).attach(layer)
    calls, patch = _counting_calls(layer.router, "_record_stats")
    x = torch.randn(8, 2, H)
    with patch:
        metrics.recording = False  # what the entry's hooks do between logged iterations
        layer(x)
        assert calls == [] and layer.router.stats_wanted is False
        metrics.recording = True
        layer(x)
        assert calls == [1]
    metrics.detach()
    assert layer.router.stats_wanted is True


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recomputed"])
def test_activation_recompute_records_statistics_counts_and_comm_stats_once(recompute):
    """Under --recompute-modules moe the layer's forward runs twice: first without grad, then
    again inside backward (torch's reentrant checkpoint has Megatron's checkpoint semantics)."""
    layer = c2r_layer(mode="topk")  # warm-up-free tracker counting on every iteration
    metrics = C2RMetrics(num_layers=1).attach(layer)
    calls, patch = _counting_calls(layer.router, "_record_stats")
    x = torch.randn(8, 2, H, requires_grad=True)
    with patch:
        if recompute:
            out = torch.utils.checkpoint.checkpoint(lambda t: layer(t)[0], x, use_reentrant=True)
        else:
            out = layer(x)[0]
        out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert calls == [1]
    assert int(layer.router.tracker.pending_tokens) == 16  # counted once, not 0 or 32
    assert layer.token_dispatcher.comm_stats.calls == 1
    metrics.record(layer)
    assert all(c == {0: 1} for c in metrics._counts.values()), metrics._counts


def test_megatrons_overlap_schedule_callables_meet_the_one_sync_in_the_dispatch_node():
    """The same placement through the callables Megatron's fine-grained 1F1B A2A overlap
    schedule (--overlap-moe-expert-parallel-comm) runs for a real TransformerLayer with our MoE
    layer, called in the schedule's order: the attention node (attention, router, dispatch
    preprocess) must not wait on the device; the dispatch node holds the one count-table copy.
    The schedule node itself is CUDA-stream plumbing: a namespace with the state it carries."""
    from types import SimpleNamespace

    from megatron.core.models.gpt.fine_grained_callables import build_transformer_layer_callables

    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.cpu.platform import cpu_block_spec, setup_cpu_megatron
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    init_parallel()
    config = moe_config(num_layers=1, hidden_size=H, num_moe_experts=8, moe_router_topk=2,
                        moe_aux_loss_coeff=0.01, attention_dropout=0.0)  # fmt: skip
    options = C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1), dispatcher="dedup")
    block = cpu_block_spec(get_c2r_decoder_block_spec(config, options, use_transformer_engine=False))
    setup_cpu_megatron(seed=0)  # the CPU runner's attention seams (megatron_c2r/cpu/platform.py)
    with megatron_cpu():
        layer = build_from_spec(block.layer_specs[0], config=config, layer_number=1).train()
    attention_node, dispatch_node, experts_node = build_transformer_layer_callables(layer)[0][:3]
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    chunk = SimpleNamespace(attention_mask=causal, rotary_pos_emb=None, rotary_pos_cos=None,
                            rotary_pos_sin=None, packed_seq_params=None, sequence_len_offset=None)  # fmt: skip
    node = SimpleNamespace(chunk_state=chunk, layer_state=SimpleNamespace(), is_mtp=False,
                           detach=lambda t: t.detach().requires_grad_(t.requires_grad))  # fmt: skip
    x = torch.randn(16, 2, H, requires_grad=True)
    audit = SyncAudit().track(layer, x)
    with megatron_cpu(), audit:
        audit.phase = "attention node"
        local_tokens, probs = attention_node(node, x)
        audit.phase = "dispatch node"
        dispatched = dispatch_node(node, local_tokens, probs)
        audit.phase = "experts node"
        out = experts_node(node, dispatched)
    assert out.shape[-1] == H and dispatched.shape[-1] == H
    assert audit.events == [("dispatch node", "Tensor.cpu")], audit.summary()
