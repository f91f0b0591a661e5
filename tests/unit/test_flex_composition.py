"""Our router on Megatron's flex dispatcher (``c2r.dispatcher: megatron`` +
``--moe-token-dispatcher-type flex``).

Flex does not take the routing map as given: its DeepEP and NCCL EP backends rebuild each token's
experts with ``torch.topk(probs, k)`` (``_DeepepManager`` / ``_NCCLEPManager.setup_metadata``)
after ``MoEFlexTokenDispatcher._initialize_metadata`` folds (routing_map, probs) over the
TP x EP ranks. So every rule must give probs > 0 on exactly its selected experts and 0 elsewhere,
with exactly k of them (fewer only where capacity dropped a slot, which DeepEP masks as -1).
These tests run a real ``C2RRouter`` for every rule, score function, with and without expert
bias and capacity dropping, then Megatron's own metadata code for every flex backend the
installed megatron-core has (constructors bypassed: they need DeepEP / TE's NCCL EP and a GPU;
the CUDA kernels themselves are in the device check, tests/gpu/test_flex_gpu.py).
"""

import pytest
import torch
from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

from megatron_c2r import compat
from megatron_c2r.megatron_lm import preflight
from megatron_c2r.moe.router import C2RRouter
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.routing.rules import RULES
from tests.megatron_cpu import moe_config
from tests.unit.test_routing_rules import random_lists

pytestmark = pytest.mark.usefixtures("megatron_world1")

E, K, H, EP = 16, 4, 32, 4
RULE_CONFIGS = {  # one router config per RULES entry
    ("topk", None): dict(mode="topk"),
    ("c2r", None): dict(mode="c2r", top_t=5),
    ("group", "anchored"): dict(mode="group", num_groups=4, max_groups=1),
    ("group", "group_score"): dict(mode="group", num_groups=4, max_groups=2, group_selection="group_score"),
    ("node", "anchored"): dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1),
    ("node", "group_score"): dict(mode="node", num_groups=4, num_nodes=2, max_nodes=1,
                                  group_selection="group_score"),
    ("group_balanced", None): dict(mode="group_balanced", num_groups=4),
}
SCORES = {  # (Megatron config, expert bias): Megatron allows the bias with sigmoid only
    "softmax": dict(moe_router_score_function="softmax"),
    "softmax_pre": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5),
    "sigmoid_bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
}
CAPACITY = {
    "dropless": {},
    "drop_probs": dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs"),
    "drop_position": dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"),
}


def test_every_rule_has_a_config_here():
    assert set(RULE_CONFIGS) == set(RULES)


def routed(rule_key, score, capacity, seed=0, device="cpu"):
    """(probs_TE, routing_map_TE) of a real C2RRouter forward (training mode, constraint on),
    on ``device`` (tests/gpu runs the same on CUDA)."""
    torch.manual_seed(seed)
    config = moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H,
                        **SCORES[score], **CAPACITY[capacity])  # fmt: skip
    cfg = C2RRouterConfig(warmup_steps=0, **RULE_CONFIGS[rule_key])
    router = C2RRouter(config, c2r_config=cfg).to(device)
    router.set_layer_number(1)
    if router.rule.needs_lists:
        router.set_top_t_lists(random_lists(E, 5, torch.Generator().manual_seed(seed)))
    if router.enable_expert_bias:  # a bias that changes the selection, as after training
        router.expert_bias.copy_(torch.randn(E) * 0.5)
    assert router._active == router.rule.constrained
    probs, routing_map = router(torch.randn(64, 2, H).to(device))
    return probs.detach(), routing_map


def folded(routing_map, probs, tp):
    """Megatron's own TP x EP fold (``MoEFlexTokenDispatcher._initialize_metadata``), flattened
    to what the backend manager sees: [T, tp * E] (experts of EP rank r repeated per TP rank)."""
    dispatcher = object.__new__(MoEFlexTokenDispatcher)  # its __init__ builds the CUDA backend
    dispatcher.tp_size, dispatcher.ep_size, dispatcher.num_local_experts = tp, EP, E // EP
    map_TRL, probs_TRL = dispatcher._initialize_metadata(routing_map, probs)
    return map_TRL.reshape(len(map_TRL), -1), probs_TRL.reshape(len(probs_TRL), -1)


def hybridep_metadata(map_TX, probs_TX, capacity_factor):
    """(routing_map, probs) as Megatron's ``_HybridEPManager.setup_metadata`` keeps them for its
    kernel (dropless, no pad-to-capacity; constructor bypassed: it needs DeepEP's hybrid-ep)."""
    from megatron.core.transformer.moe.token_dispatcher import _HybridEPManager

    manager = object.__new__(_HybridEPManager)
    manager.config = moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H,
                                moe_expert_capacity_factor=capacity_factor)  # fmt: skip
    manager.num_experts, manager.num_local_experts = map_TX.shape[1], E // EP
    manager.capacity_factor, manager.drop_and_pad = capacity_factor, False
    manager.moe_expert_rank_capacity_factor = None  # 0.19: no per-rank budget
    manager.setup_metadata(map_TX, probs_TX)
    return manager.routing_map, manager.token_probs


def rebuilt_map(indices_TK, width):
    """The routing map a backend's (indices, -1 = not sent) stands for."""
    sent = indices_TK >= 0
    out = torch.zeros(indices_TK.shape[0], width + 1, dtype=torch.bool, device=indices_TK.device)
    out.scatter_(1, torch.where(sent, indices_TK, width), True)
    return out[:, :width]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("rule_key", RULE_CONFIGS, ids=lambda k: "/".join(filter(None, k)))
def test_probs_are_positive_exactly_on_the_routing_map_so_flex_topk_recovers_it(rule_key, score):
    check_flex_invariant(rule_key, score, "cpu")


def check_flex_invariant(rule_key, score, device):
    for capacity in CAPACITY:
        probs, routing_map = routed(rule_key, score, capacity, device=device)
        per_token = routing_map.sum(dim=1)
        # 1. The invariant itself: probs > 0 exactly on the map; k experts per token, fewer only
        #    where capacity dropped a (token, expert) slot (dropping zeroes probs and map together).
        assert torch.equal(probs > 0, routing_map), (capacity, "probs > 0 off or 0 on the map")
        if capacity == "dropless":
            assert torch.all(per_token == K)
        else:
            assert torch.all(per_token <= K) and bool((per_token < K).any()), "nothing dropped"
        cf = CAPACITY[capacity].get("moe_expert_capacity_factor")
        for tp in (1, 2):
            map_TX, probs_TX = folded(routing_map, probs, tp)
            for backend in compat.flex_backends():
                out = compat.flex_token_indices(backend, map_TX, probs_TX, topk=tp * K,
                                                capacity_factor=cf)  # fmt: skip
                if out is None:  # hybridep: its own setup_metadata keeps the map and probs
                    kept_map, kept_probs = hybridep_metadata(map_TX, probs_TX, cf)
                    assert torch.equal(kept_map, map_TX) and torch.equal(kept_probs, probs_TX)
                    continue
                indices_TK, probs_TK = out
                recovered = rebuilt_map(indices_TK, map_TX.shape[1])
                where = (capacity, tp, backend)
                if capacity == "dropless" or backend == "deepep":
                    # 2. Megatron's topk (with DeepEP's -1 mask for dropped slots) gives back
                    #    exactly the router's experts and weights.
                    assert torch.equal(recovered, map_TX), where
                    sent = indices_TK >= 0
                    assert torch.equal(probs_TK[sent], probs_TX.gather(1, indices_TK.clamp(min=0))[sent])
                    assert torch.all(probs_TK[sent] > 0), where
                else:
                    # 3. A backend that does not mask dropped slots (ncclep, 0.19) re-adds experts
                    #    with weight 0: why the model-build check refuses it with a capacity factor.
                    assert not torch.equal(recovered, map_TX) and bool((recovered & ~map_TX).any())


@pytest.mark.parametrize("backend", ["deepep", "hybridep", "ncclep"])
def test_the_model_build_check_refuses_what_the_installed_flex_cannot_build_in_one_line(backend):
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64", "--num-experts", "16",
            "--moe-router-topk", "4", "--moe-token-dispatcher-type", "flex",
            "--moe-flex-dispatcher-backend", backend, "--c2r-mode", "group", "--c2r-num-groups",
            "4", "--c2r-max-groups", "1", "--c2r-dispatcher", "megatron"]  # fmt: skip
    ep4 = base + ["--expert-model-parallel-size", "4"]
    problem = preflight.model_build_problem
    if backend not in compat.flex_backends():
        assert f"moe_flex_dispatcher_backend={backend!r} is not a flex backend" in problem(ep4)
        return
    rank_capacity = ["--moe-expert-rank-capacity-factor", "2.0"] if backend == "ncclep" else []
    assert problem(ep4 + rank_capacity) is None
    dedup = [a if a != "megatron" else "dedup" for a in ep4]
    assert "set c2r.dispatcher: megatron" in problem(dedup + rank_capacity)
    one_rank = problem(base + rank_capacity)  # TP x EP = 1
    if backend == "hybridep" and "ncclep" in compat.flex_backends():
        assert one_rank is None  # 0.19 asserts TP x EP > 1 for deepep and ncclep only
    else:
        assert "needs tensor x expert parallel > 1" in one_rank
    drop = ["--moe-expert-capacity-factor", "1.0"]
    if backend == "ncclep":
        assert "needs moe_expert_rank_capacity_factor" in problem(ep4)
        assert "does not mask the dropped ones" in problem(ep4 + rank_capacity + drop)
    else:
        assert problem(ep4 + drop) is None
    pad = problem(ep4 + rank_capacity + drop + ["--moe-pad-expert-input-to-capacity"])
    if backend == "deepep":  # Megatron's own refusal, reported as is
        assert "TransformerConfig refuses" in pad and "moe_pad_expert_input_to_capacity" in pad
    for text in filter(None, [problem(dedup), problem(base)]):
        assert "\n" not in text


def test_the_router_refuses_at_build_what_flex_would_refuse_or_mis_route_before_the_dispatcher():
    """At model build the router is built before Megatron's dispatcher: the same one line as
    render's check (here TP x EP = 1 in this one-rank world, or a backend not installed)."""
    config = moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H,
                        moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep")
    with pytest.raises(ValueError, match="needs tensor x expert parallel > 1") as info:
        C2RRouter(config, c2r_config=C2RRouterConfig(mode="group", num_groups=4))
    assert "\n" not in str(info.value)
    C2RRouter(moe_config(num_moe_experts=E, moe_router_topk=K, hidden_size=H),
              c2r_config=C2RRouterConfig(mode="group", num_groups=4))  # alltoall: no flex check


def test_render_refuses_a_flex_backend_problem_of_a_shipped_flex_config_in_one_line(monkeypatch, capsys):
    from megatron_c2r.cli import main as cli_main
    from tests.unit.test_config_render import ROOT

    monkeypatch.chdir(ROOT)
    code = cli_main(["render", "configs/deepseek_v3_like_flex_c2r.yaml", "--set",
                     "megatron.moe-flex-dispatcher-backend=ncclep"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model build: moe_flex_dispatcher_backend='ncclep'" in err
