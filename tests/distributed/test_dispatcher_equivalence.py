"""The dedup dispatcher against Megatron's stock alltoall dispatcher and a dense single-process
reference, on real gloo process groups (EP = 2 and 4), through real megatron.core MoE layers.

Megatron's layer is the oracle: same router weights, same expert weights, same inputs. The dedup
layer is built and (where no stock router is involved) run *without* the CPU patches, showing the
product code needs none. Worker functions run on every rank of the session's gloo pool.
"""

from __future__ import annotations

import pytest
import torch

from megatron_c2r.compat import moe_submodules
import torch.distributed as dist
import torch.nn.functional as F

from megatron_c2r.comm import count_rows
from megatron_c2r.comm.reference import dense_moe_reference
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

H, FFN, E = 16, 8, 8
TOL = 1e-6  # relative (norm-wise), fp32


# ----------------------------------------------------------------------------------------------
# Helpers (run inside workers)
# ----------------------------------------------------------------------------------------------
def build_layer(dispatcher: str, ep: int, tp: int = 1, **overrides):
    """A C2RMoELayer (dedup) or stock MoELayer (megatron) with identical, deterministic weights:
    router weights equal on every rank, expert e's weights drawn from a generator seeded by e."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r.moe.layer import C2RMoELayer

    init_parallel(ep=ep, tp=tp)
    base = dict(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E)
    if tp > 1:  # attention TP with sequence parallel; experts stay whole (expert TP 1)
        base.update(tensor_model_parallel_size=tp, sequence_parallel=True)
    config = moe_config(**{**base, **overrides})
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    torch.manual_seed(1234)
    if dispatcher == "megatron":
        with megatron_cpu():
            layer = MoELayer(config, moe_submodules(spec))
    else:
        layer = C2RMoELayer(config, moe_submodules(spec), dispatcher="dedup")
    L = layer.num_local_experts
    rank = dist.get_rank()
    for j, expert in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(100 + rank * L + j)
        for p in expert.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5
    return layer


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_layer(layer, x, grad_out, routing=None):
    """Forward+backward. With ``routing=(routing_map, probs)`` the router is bypassed and the
    layer's own stage methods run (MoELayer.preprocess/dispatch/routed_experts_compute/combine/
    postprocess); probs is then a leaf and its grad stands in for the router's."""
    x = x.detach().clone().requires_grad_()
    if routing is None:
        out, _ = layer(x)
        prob_grad_of = layer.router.weight
    else:
        routing_map, probs = routing
        probs = probs.detach().clone().requires_grad_()
        h, p = layer.preprocess(x, probs, routing_map)
        h, p = layer.dispatch(h, p)
        y, _ = layer.routed_experts_compute(h, p)
        out = layer.postprocess(layer.combine(y), None)
        prob_grad_of = probs
    (out * grad_out).sum().backward()
    expert_grads = [p.grad.clone() for p in layer.experts.parameters()]
    return dict(out=out.detach(), x_grad=x.grad, experts=expert_grads, probs=prob_grad_of.grad)


def gathered_experts(layer):
    """All E experts as dense callables, from the local weights all-gathered over the EP group."""
    def gather(name):
        local = torch.stack([getattr(e, name).weight.detach() for e in layer.experts.local_experts])
        out = local.new_empty((dist.get_world_size() * local.shape[0],) + local.shape[1:])
        dist.all_gather_into_tensor(out, local.contiguous())
        return out

    w1, w2 = gather("linear_fc1"), gather("linear_fc2")
    return [lambda h, a=a.float(), b=b.float(): F.gelu(h @ a.T) @ b.T for a, b in zip(w1, w2)]


def inputs(tokens_per_rank, seed=0, dtype=torch.float32):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 100 + rank)
    S = tokens_per_rank[rank]
    x = torch.randn(S, 1, H, generator=g).to(dtype)
    return x, torch.randn(S, 1, H, generator=g).to(dtype)


def compare(a, b) -> dict:
    errs = {k: rel(a[k], b[k]) for k in ("out", "x_grad", "probs")}
    errs["experts"] = max(rel(p, q) for p, q in zip(a["experts"], b["experts"]))
    return errs


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------
def _router_driven_equivalence(ep, tokens_per_rank, overrides, tp=1):
    """Full layer forward+backward with the stock TopKRouter; dedup vs megatron vs dense."""
    x, grad_out = inputs(tokens_per_rank)
    with megatron_cpu():  # the stock router's gating and the stock dispatcher need it
        ours = build_layer("dedup", ep, tp, **overrides)
        theirs = build_layer("megatron", ep, tp, **overrides)
        theirs.load_state_dict(ours.state_dict())
        got = run_layer(ours, x, grad_out)
        want = run_layer(theirs, x, grad_out)
        # Dense reference: same router, all experts gathered, one process's tokens.
        x2 = x.detach().clone().requires_grad_()
        probs, routing_map = ours.router(x2)
        dense = dense_moe_reference(x2.view(-1, H), routing_map, probs, gathered_experts(ours))
        dense = dense.view_as(x2)
        if ours.shared_experts is not None:
            dense = dense + ours.shared_experts(x2)
        dx, dw = torch.autograd.grad((dense * grad_out).sum(), [x2, ours.router.weight])
    stats = ours.comm_stats
    return dict(
        vs_megatron=compare(got, want),
        vs_dense=dict(out=rel(got["out"], dense), x_grad=rel(got["x_grad"], dx),
                      probs=rel(got["probs"], dw)),  # fmt: skip
        rows=stats.rows_dispatched,
        brute_rows=count_rows(routing_map, ep, dist.get_rank())["rows"],
        megatron_rows=stats.megatron_rows_dispatched,
        brute_megatron_rows=int(routing_map.sum()),
    )


def _routing_driven_equivalence(ep, tokens_per_rank, case, k, dtype_name="float32"):
    """Stage-driven forward+backward with a routing map built for an edge case; the dedup layer
    runs outside ``megatron_cpu()``."""
    dtype = getattr(torch, dtype_name)
    overrides = dict(moe_router_topk=k, moe_router_pre_softmax=k == 1)
    if dtype is torch.bfloat16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    x, grad_out = inputs(tokens_per_rank, seed=7, dtype=dtype)
    routing_map, probs = edge_case_routing(case, x.shape[0], k, ep, seed=dist.get_rank())
    ours = build_layer("dedup", ep, **overrides)
    got = run_layer(ours, x, grad_out, (routing_map, probs))
    with megatron_cpu():
        theirs = build_layer("megatron", ep, **overrides)
        theirs.load_state_dict(ours.state_dict())
        want = run_layer(theirs, x, grad_out, (routing_map, probs))
    x2 = x.detach().clone().requires_grad_()
    p2 = probs.detach().clone().requires_grad_()
    experts = gathered_experts(ours)
    dense = dense_moe_reference(x2.view(-1, H).float(), routing_map, p2, experts).view_as(x2)
    dx, dp = torch.autograd.grad((dense * grad_out).sum(), [x2, p2])
    stats = ours.token_dispatcher.last_stats
    return dict(
        vs_megatron=compare(got, want),
        vs_dense=dict(out=rel(got["out"], dense), x_grad=rel(got["x_grad"], dx),
                      probs=rel(got["probs"], dp)),  # fmt: skip
        rows=stats.rows_dispatched,
        brute_rows=count_rows(routing_map, ep, dist.get_rank())["rows"],
        received=stats.rows_combined,
        tokens_per_expert=ours.token_dispatcher.tokens_per_expert.tolist(),
    )


def edge_case_routing(case, T, k, P, seed):
    """Routing maps for the issue's edge cases (same on every call with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    L, rank = E // P, dist.get_rank()
    scores = torch.rand(T, E, generator=g)
    if case == "random":
        chosen = scores.topk(k, dim=1).indices
    elif case == "only_rank0_experts":  # every other rank receives no rows
        chosen = scores[:, :L].topk(k, dim=1).indices
    elif case == "one_expert":  # all tokens of all ranks to expert E-1 (k = 1)
        chosen = torch.full((T, 1), E - 1)
    elif case == "own_rank":  # every token's k experts sit on its own rank
        chosen = scores[:, rank * L : (rank + 1) * L].topk(k, dim=1).indices + rank * L
    elif case == "group_m1":  # one random rank per token, top-k inside its block
        block = torch.randint(0, P, (T, 1), generator=g)
        chosen = scores.view(T, P, L)[torch.arange(T), block[:, 0]].topk(k, dim=1).indices
        chosen = chosen + block * L
    else:
        raise ValueError(case)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.where(routing_map, scores.softmax(dim=1), 0.0)
    return routing_map, probs


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def check(results, tol=TOL):
    for rank, r in enumerate(results):
        for ref in ("vs_megatron", "vs_dense"):
            bad = {k: v for k, v in r[ref].items() if not v <= tol}
            assert not bad, f"rank {rank} {ref}: {bad}"
        assert r["rows"] == r["brute_rows"], f"rank {rank}: {r['rows']} != {r['brute_rows']}"


@pytest.mark.world_size(2)
def test_dedup_layer_equals_megatron_alltoall_and_dense_reference_at_ep2(dist_pool):
    results = dist_pool(2).run(_router_driven_equivalence, 2, [6, 6], dict(moe_router_topk=2))
    check(results)
    assert all(r["megatron_rows"] == r["brute_megatron_rows"] for r in results)


@pytest.mark.world_size(4)
def test_dedup_layer_equals_megatron_alltoall_and_dense_reference_at_ep4(dist_pool):
    results = dist_pool(4).run(_router_driven_equivalence, 4, [5, 7, 6, 4], dict(moe_router_topk=3))
    check(results)


@pytest.mark.world_size(2)
def test_shared_experts_and_capacity_dropping_match_megatron(dist_pool):
    overrides = dict(
        moe_router_topk=2,
        moe_shared_expert_intermediate_size=8,
        moe_expert_capacity_factor=0.5,
        moe_token_drop_policy="probs",
    )
    results = dist_pool(2).run(_router_driven_equivalence, 2, [8, 8], overrides)
    check(results)
    assert all(r["brute_megatron_rows"] < 16 * 2 for r in results)  # some tokens were dropped


@pytest.mark.world_size(2)
def test_tensor_parallel_with_sequence_parallel_matches_megatron_at_tp2_ep2(dist_pool):
    # Each TP rank holds its own sequence shard [S/TP, B, H]; EP spans the two TP ranks.
    results = dist_pool(2).run(_router_driven_equivalence, 2, [6, 6], {}, 2)
    check(results)


EDGE_CASES = [
    # (ep, tokens per rank, case, k)
    (2, [6, 6], "only_rank0_experts", 2),  # rank 1 receives no rows
    (2, [5, 9], "one_expert", 1),  # all tokens to one expert; uneven token counts
    (4, [4, 6, 3, 5], "random", 1),  # k = 1
    (2, [7, 5], "random", 4),  # k = experts per rank (4)
    (4, [5, 5, 5, 5], "own_rank", 2),  # k = experts per rank (2); all experts on own rank
    (4, [6, 3, 5, 4], "group_m1", 2),  # one destination rank per token
]


@pytest.mark.parametrize(
    "ep,tokens,case,k", EDGE_CASES, ids=[f"{c[2]}-ep{c[0]}-k{c[3]}" for c in EDGE_CASES]
)
def test_edge_case_routing_matches_megatron_and_dense_reference(dist_pool, ep, tokens, case, k):
    results = dist_pool(ep).run(_routing_driven_equivalence, ep, tokens, case, k)
    check(results)
    if case == "only_rank0_experts":
        assert [r["received"] > 0 for r in results] == [True, False]
    if case == "one_expert":
        assert results[-1]["tokens_per_expert"] == [0, 0, 0, sum(tokens)]
    if case in ("own_rank", "group_m1"):
        assert all(r["rows"] == t for r, t in zip(results, tokens))  # one row per token


@pytest.mark.world_size(2)
def test_bf16_hidden_states_match_megatron_alltoall(dist_pool):
    results = dist_pool(2).run(_routing_driven_equivalence, 2, [6, 6], "random", 2, "bfloat16")
    check(results, tol=2e-2)
