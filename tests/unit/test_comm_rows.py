"""The pure row-building steps of the dedup communicator against their loop oracles."""

import pytest
import torch

from megatron_c2r.comm import (
    build_send_rows,
    combine_rows,
    count_send_rows,
    expand_rows,
    precombine_rows,
    reference_all_to_all,
)
from megatron_c2r.comm.reference import (
    dense_moe_reference,
    reference_expand,
    reference_precombine,
    reference_send_rows,
    simulate_dedup_moe,
)


def random_routing(T, E, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(T, E, generator=g, dtype=torch.float64).softmax(dim=1)
    top_TK = scores_TE.topk(k, dim=1).indices
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, top_TK, True)
    probs_TE = torch.where(routing_map_TE, scores_TE, 0.0).to(dtype)
    return routing_map_TE, probs_TE


def rows_as_python(send, P):
    """Decode a SendRows into the oracle's list-of-rows form."""
    S = send.meta_RM.shape[1] // 2
    ranks = torch.repeat_interleave(torch.arange(P), send.counts_PC[:, 0])
    rows = []
    for r in range(send.token_idx_R.numel()):
        experts = [
            (int(send.meta_RM[r, S + s]), float(send.meta_RM[r, s]))
            for s in range(S)
            if send.meta_RM[r, S + s] >= 0
        ]
        rows.append((int(send.token_idx_R[r]), int(ranks[r]), experts))
    return rows


@pytest.mark.parametrize("T,E,k,P", [(12, 8, 2, 2), (20, 16, 4, 4), (9, 8, 1, 4), (7, 8, 4, 2)])
def test_send_rows_are_one_per_token_and_destination_rank_with_local_experts(T, E, k, P):
    routing_map_TE, probs_TE = random_routing(T, E, k, seed=T)
    send = build_send_rows(routing_map_TE, probs_TE, P, num_slots=min(k, E // P))
    assert rows_as_python(send, P) == reference_send_rows(
        routing_map_TE, probs_TE, P
    )
    assert int(send.counts_PC[:, 1:].sum()) == T * k
    assert int(send.max_experts_per_row) <= min(k, E // P)
    # The dispatcher's path: counts first, then rows sized from the host copy of the table.
    counts = count_send_rows(routing_map_TE, P)
    num_rows = int(counts.counts_PC[:, 0].sum())
    static = build_send_rows(
        routing_map_TE, probs_TE, P, min(k, E // P), counts=counts, num_rows=num_rows
    )
    assert torch.equal(static.token_idx_R, send.token_idx_R)
    assert torch.equal(static.meta_RM, send.meta_RM)
    assert static.counts_PC is counts.counts_PC  # not recomputed


def test_count_send_rows_matches_a_loop_count():
    routing_map_TE, _ = random_routing(11, 8, 3, seed=5)
    counts = count_send_rows(routing_map_TE, 4)
    table = [[0] * 3 for _ in range(4)]
    most = 0
    for t in range(11):
        for p in range(4):
            experts = [j for j in range(2) if routing_map_TE[t, 2 * p + j]]
            table[p][0] += bool(experts)
            for j in experts:
                table[p][1 + j] += 1
            most = max(most, len(experts))
    assert counts.counts_PC.tolist() == table
    assert int(counts.max_experts_per_row) == most
    assert int(counts.routed_tokens) == 11
    assert counts.rank_mask_PT.shape == (4, 11)


def test_a_row_with_more_experts_than_slots_is_reported_not_hidden():
    routing_map_TE = torch.zeros(2, 8, dtype=torch.bool)
    routing_map_TE[0, :3] = True  # three experts of rank 0
    send = build_send_rows(routing_map_TE, routing_map_TE.float(), ep_size=2, num_slots=2)
    assert int(send.max_experts_per_row) == 3


def test_an_empty_routing_map_sends_no_rows():
    routing_map_TE = torch.zeros(5, 8, dtype=torch.bool)
    send = build_send_rows(routing_map_TE, torch.zeros(5, 8), ep_size=4, num_slots=2)
    assert send.token_idx_R.numel() == 0 and int(send.max_experts_per_row) == 0
    assert int(send.routed_tokens) == 0


@pytest.mark.parametrize("sized", [False, True], ids=["nonzero", "host_sized"])
def test_expansion_groups_rows_by_local_expert_in_row_order(sized):
    routing_map_TE, probs_TE = random_routing(15, 8, 3, seed=3)
    send = build_send_rows(routing_map_TE, probs_TE, ep_size=2, num_slots=3)
    num_expert_rows = int(routing_map_TE.sum()) if sized else None
    expanded = expand_rows(send.meta_RM, num_local_experts=4, num_expert_rows=num_expert_rows)
    oracle = reference_expand(reference_send_rows(routing_map_TE, probs_TE, 2), 4)
    pairs = list(zip(expanded.row_idx_N.tolist(), expanded.probs_N.tolist()))
    got, start = [], 0
    for count in expanded.tokens_per_expert_L.tolist():
        got.append(pairs[start : start + count])
        start += count
    assert got == oracle
    assert expanded.expert_N.tolist() == sorted(expanded.expert_N.tolist())


def test_expansion_passes_gradients_to_the_slot_probs_it_read():
    routing_map_TE, probs_TE = random_routing(9, 8, 2, seed=4)
    send = build_send_rows(routing_map_TE, probs_TE, ep_size=2, num_slots=2)
    meta_QM = send.meta_RM.clone().requires_grad_()
    expanded = expand_rows(meta_QM, 4, num_expert_rows=int(routing_map_TE.sum()))
    weights_N = torch.arange(1.0, expanded.probs_N.numel() + 1)
    (expanded.probs_N * weights_N).sum().backward()
    want = torch.zeros_like(meta_QM)
    slots = meta_QM.shape[1] // 2
    for n, (q, j) in enumerate(zip(expanded.row_idx_N.tolist(), expanded.expert_N.tolist())):
        slot = meta_QM[q, slots:].tolist().index(float(j))
        want[q, slot] = weights_N[n]
    torch.testing.assert_close(meta_QM.grad, want)


def test_precombine_sums_the_expert_outputs_of_each_row():
    row_idx_N = torch.tensor([0, 2, 2, 1, 0, 2])
    y_NH = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(
        precombine_rows(y_NH, row_idx_N, 4), reference_precombine(y_NH, row_idx_N.tolist(), 4)
    )


def test_combine_sums_returned_rows_into_their_tokens_and_zero_fills_unrouted_tokens():
    y_RH = torch.arange(8.0).view(4, 2)
    out_TH = combine_rows(y_RH, torch.tensor([0, 2, 0, 2]), num_tokens=4)
    torch.testing.assert_close(out_TH, torch.tensor([[4.0, 6], [0, 0], [8, 10], [0, 0]]))


def test_reference_all_to_all_delivers_chunks_in_source_rank_order():
    inputs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    out = reference_all_to_all(inputs, [[1, 2], [0, 2]])
    assert [o.tolist() for o in out] == [[1], [2, 3, 4, 5]]


@pytest.mark.parametrize("P,k", [(2, 2), (4, 4), (4, 1)])
def test_the_simulated_dedup_path_equals_the_dense_moe_and_passes_gradients(P, k):
    E, H = 8, 6
    torch.manual_seed(P * 10 + k)
    weights = [torch.randn(H, H, dtype=torch.float64) for _ in range(E)]
    experts = [lambda x, w=w: torch.tanh(x @ w) for w in weights]
    xs, maps, probs = [], [], []
    for rank in range(P):
        m, p = random_routing(5 + rank, E, k, seed=rank, dtype=torch.float64)
        xs.append(torch.randn(5 + rank, H, dtype=torch.float64, requires_grad=True))
        maps.append(m)
        probs.append(p.requires_grad_())
    outs = simulate_dedup_moe(xs, maps, probs, experts, num_slots=min(k, E // P))
    dense = [dense_moe_reference(x, m, p, experts) for x, m, p in zip(xs, maps, probs)]
    for o, d in zip(outs, dense):
        torch.testing.assert_close(o, d)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), xs + probs)
    dense_grads = torch.autograd.grad(sum(d.sum() for d in dense), xs + probs)
    for g, dg in zip(grads, dense_grads):
        torch.testing.assert_close(g, dg)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [0, 6], ids=["no_tokens", "nothing_routed"])
def test_zero_host_sized_rows_skip_nonzero_static_which_crashes_on_empty_cuda_inputs(T):
    """pytorch#162473: nonzero_static on an empty CUDA input crashes before torch 2.10; a rank
    that receives nothing (or T = 0) must not call it."""
    routing_map_TE = torch.zeros(T, 8, dtype=torch.bool)
    with _OpLog() as log:
        send = build_send_rows(routing_map_TE, torch.zeros(T, 8), ep_size=4, num_slots=2, num_rows=0)
        expanded = expand_rows(send.meta_RM, num_local_experts=2, num_expert_rows=0)
    assert "nonzero_static" not in log.ops and "nonzero" not in log.ops
    assert send.token_idx_R.shape == (0,) and send.meta_RM.shape[0] == 0
    assert expanded.row_idx_N.shape == (0,) and expanded.expert_N.shape == (0,)
