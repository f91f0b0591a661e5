"""BigMac low-dimensional dispatch on real gloo process groups (EP = 2, and EP = 4 as 2 simulated
nodes x 2 ranks for the two-level dispatcher), through real megatron.core MoE layers.

Oracles: the same BigMac layer with Megatron's alltoall dispatcher (at width d) and a dense
single-process reference (all experts gathered, ``up(sum_e p * expert_e(down(x)))``). Bytes: the
router scores the same full-width tokens, so every width ships the same rows, and the hidden part
of every counted byte scales by exactly d/H, on top of the dedup dispatcher's row reduction.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from megatron_c2r.comm.reference import dense_moe_reference
from megatron_c2r.compat import moe_submodules, replace_moe_submodules
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

H, E, K, FFN = 16, 8, 4, 8
TOL = 1e-6  # relative (norm-wise), fp32


def build(d, ep, dispatcher="dedup", router=None, gpus_per_node=None):
    """A LowDimMoELayer at width d (or the plain C2RMoELayer for d=None); router weights from
    seed 0 on every rank, expert e's weights from a generator seeded by its global id."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    from megatron_c2r.moe.bigmac import LowDimMoELayer
    from megatron_c2r.moe.layer import C2RMoELayer
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.moe.two_level_dispatcher import TwoLevelDedupTokenDispatcher

    init_parallel(ep=ep)
    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E, moe_router_topk=K)
    spec = get_moe_module_spec(use_te=False, num_experts=E)
    c2r = router or C2RRouterConfig(mode="topk")
    spec = moe_submodules(
        replace_moe_submodules(spec, router=functools.partial(C2RRouter, c2r_config=c2r))
    )
    torch.manual_seed(0)
    if d is None:
        layer = C2RMoELayer(config, spec, dispatcher=dispatcher)
    else:
        layer = LowDimMoELayer(config, spec, dispatcher=dispatcher, dispatch_dim=d,
                               dispatch_ffn_hidden_size=FFN)  # fmt: skip
        g = torch.Generator().manual_seed(11)  # projections equal on every rank
        for p in (layer.dispatch_down.weight, layer.dispatch_up.weight):
            p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
    torch.manual_seed(0)
    layer.router.weight.data = torch.randn(E, H) * 0.5
    L = layer.num_local_experts
    for j, expert in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(100 + dist.get_rank() * L + j)
        for p in expert.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    if gpus_per_node is not None:  # what C2RMoELayer installs for c2r.hierarchy=two_level
        layer.token_dispatcher = TwoLevelDedupTokenDispatcher(
            L, layer.local_expert_indices, config=layer.config, gpus_per_node=gpus_per_node
        )
    return layer


def inputs(tokens=24, seed=0):
    g = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    return torch.randn(tokens, 1, H, generator=g), torch.randn(tokens, 1, H, generator=g)


def run(layer, x, grad):
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    (out * grad).sum().backward()
    params = [layer.router.weight, *layer.experts.parameters()]
    if hasattr(layer, "dispatch_down"):
        params += [layer.dispatch_down.weight, layer.dispatch_up.weight]
    return dict(out=out.detach(), x=x.grad, params=[p.grad.clone() for p in params])


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(a, b) -> float:
    return max([rel(a["out"], b["out"]), rel(a["x"], b["x"])]
               + [rel(p, q) for p, q in zip(a["params"], b["params"])])  # fmt: skip


def dense_reference(layer, x, grad, d):
    """One process: this rank's tokens through every expert (gathered over EP) at width d."""
    def gather(name):
        local = torch.stack([getattr(e, name).weight.detach() for e in layer.experts.local_experts])
        out = local.new_empty((dist.get_world_size() * local.shape[0],) + local.shape[1:])
        dist.all_gather_into_tensor(out, local.contiguous())
        return out

    w1, w2 = gather("linear_fc1"), gather("linear_fc2")
    experts = [lambda h, a=a, b=b: torch.nn.functional.gelu(h @ a.T) @ b.T for a, b in zip(w1, w2)]
    x = x.clone().requires_grad_()
    probs, routing_map = layer.router(x)
    low = dense_moe_reference(layer.dispatch_down(x).view(-1, d), routing_map, probs, experts)
    out = layer.dispatch_up(low).view_as(x)
    dx, = torch.autograd.grad((out * grad).sum(), [x])
    return dict(out=out.detach(), x=dx)


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------
def _equivalence(ep, d):
    x, grad = inputs()
    with megatron_cpu():  # Megatron's alltoall dispatcher on CPU (the oracle only)
        ours, theirs = build(d, ep), build(d, ep, dispatcher="megatron")
        theirs.load_state_dict(ours.state_dict())
        got, want = run(ours, x, grad), run(theirs, x, grad)
    dense = dense_reference(ours, x, grad, d)
    return dict(vs_megatron=compare(got, want),
                vs_dense=max(rel(got["out"], dense["out"]), rel(got["x"], dense["x"])))  # fmt: skip


def _bytes_by_width(ep, router, gpus_per_node=None):
    """Counters of one forward at widths H, H/2, H/4 (and the plain layer) on identical routing."""
    x, _ = inputs(tokens=64, seed=1)
    out = {}
    for name, d in [("plain", None), ("H", H), ("H/2", H // 2), ("H/4", H // 4)]:
        layer = build(d, ep, router=router, gpus_per_node=gpus_per_node)
        with torch.no_grad():
            layer(x)
        out[name] = layer.comm_stats.as_dict()
    return out


def _two_level_equals_flat(ep, gpus_per_node, d):
    x, grad = inputs()
    flat, two = build(d, ep), build(d, ep, gpus_per_node=gpus_per_node)
    two.load_state_dict(flat.state_dict())
    return compare(run(two, x, grad), run(flat, x, grad))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [H, H // 4], ids=["d=H", "d=H/4"])
def test_bigmac_with_dedup_equals_bigmac_with_megatron_alltoall_and_the_dense_reference(
    dist_pool, d
):
    for r in dist_pool(2).run(_equivalence, 2, d):
        assert r["vs_megatron"] < TOL, r
        assert r["vs_dense"] < TOL, r


@pytest.mark.parametrize(
    "router",
    [C2RRouterConfig(mode="topk"), C2RRouterConfig(mode="group", max_groups=1)],
    ids=["topk", "group_M1"],
)
def test_shipped_bytes_scale_by_d_over_h_on_top_of_the_dedup_row_reduction(dist_pool, router):
    for r in dist_pool(2).run(_bytes_by_width, 2, router):
        plain = r["plain"]
        rows = plain["rows_dispatched_remote"]
        assert rows > 0
        # Metadata per row: what the plain layer ships beyond H fp32 values per remote row.
        meta = plain["bytes_dispatched_remote"] // rows - H * 4
        for name, d in [("H", H), ("H/2", H // 2), ("H/4", H // 4)]:
            s = r[name]
            assert s["rows_dispatched_remote"] == rows  # same routing: the router saw width H
            assert s["bytes_dispatched_remote"] == rows * (d * 4 + meta)
            assert s["bytes_combined_remote"] * H == plain["bytes_combined_remote"] * d
            # Megatron's alltoall at full width / ours at d = the dedup reduction x H/d.
            theirs = plain["megatron_bytes_combined_remote"]
            dedup = theirs / plain["bytes_combined_remote"]
            assert theirs / s["bytes_combined_remote"] == pytest.approx(dedup * H / d, rel=1e-12)
        if router.mode == "group":
            assert plain["ranks_per_token"] == 1.0 and plain["dispatch_row_reduction"] == K


def test_two_level_dispatch_of_bigmac_rows_equals_flat_and_its_inter_node_bytes_scale(dist_pool):
    results = dist_pool(4).run(_two_level_equals_flat, 4, 2, H // 4)
    assert all(err < TOL for err in results), results
    for r in dist_pool(4).run(_bytes_by_width, 4, C2RRouterConfig(mode="topk"), 2):
        full, half, quarter = (r[k]["inter_node_bytes"] for k in ("H", "H/2", "H/4"))
        sent, received = r["H"]["inter_node_rows_sent"], r["H"]["inter_node_rows_received"]
        assert sent > 0 and r["H/4"]["inter_node_rows_sent"] == sent
        # bytes(d) = sent * (4d + meta) + received * 4d: linear in d with slope 4 (sent + received)
        assert full - half == (H // 2) * 4 * (sent + received)
        assert half - quarter == (H // 4) * 4 * (sent + received)
        assert r["plain"]["inter_node_bytes"] == full
