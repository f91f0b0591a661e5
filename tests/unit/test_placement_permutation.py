"""Relabelling experts is one permutation, applied the same way by every caller.

Property: relabel with ``order`` then with its inverse is the identity on every kind of state,
and the intermediate state is what the definition says (so the round trip cannot pass by doing
nothing): the pure kinds against loop oracles; a live C2RRouter (tracker, top-T lists, a
non-default group map, expert bias, AdamW state); SequentialMLP and GroupedMLP experts with
AdamW state; checkpoint key families (stacked and per-expert keys, optimizer keys, C2R router
state, per-expert objects); a plan's top-T lists.
Agreement: on one GPTModel with C2R routers, in-model relabelling (``relabel_model_``), offline
``convert`` (save -> convert -> load) and in-run replanning (``relabel_in_run_``) give the same
tensors, and the streaming converter writes what the whole-tensor oracle (``relabel_tensors``)
computes. Megatron pieces run in the session's 1-process gloo pool.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from megatron_c2r.placement import permutation as perm
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

E, H, FFN, LAYERS = 8, 16, 8, 2
ORDERS = [[5, 2, 7, 0, 1, 6, 3, 4], [1, 0, 3, 2, 5, 4, 7, 6]]
GROUPS = [1, 0, 1, 0, 0, 1, 0, 1]  # a non-default balanced partition into 2 groups


def _inverse(order):
    return perm.inverse_order(torch.tensor(order)).tolist()


def _plan(orders, num_experts=E, ep=2, lists=None):
    from megatron_c2r.placement.plan_file import Plan, PlanLayer

    size = num_experts // ep
    layers = [PlanLayer.from_groups(i, [o[g * size:(g + 1) * size] for g in range(ep)], {},
                                    top_t_lists=None if lists is None else lists[i])
              for i, o in enumerate(orders)]
    return Plan(num_experts=num_experts, ep_size=ep, top_k=2, layers=layers)


# ------------------------------------------------------------------------------------------
# Pure kinds
# ------------------------------------------------------------------------------------------
def _oracle(kind, t, order):
    """The definitions, element by element."""
    inv = _inverse(order)
    n = len(order)
    if kind == perm.ROWS:
        return torch.stack([t[order[i]] for i in range(n)])
    if kind == perm.PAIRS:
        return torch.tensor([[t[order[i], order[j]].item() for j in range(n)] for i in range(n)])
    if kind == perm.LISTS:
        return torch.tensor([[inv[x] for x in t[order[i]].tolist()] for i in range(n)],
                            dtype=t.dtype).view(t.shape)
    return t


@pytest.mark.parametrize("kind", [perm.ROWS, perm.PAIRS, perm.LISTS, perm.SAME])
def test_each_kind_matches_its_definition_and_its_inverse_undoes_it(kind):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(E, generator=g)
    t = {perm.ROWS: torch.randn(E, 3, generator=g),
         perm.PAIRS: torch.randint(0, 50, (E, E), generator=g),
         perm.LISTS: torch.stack([torch.randperm(E - 1, generator=g)[:3] for _ in range(E)]),
         perm.SAME: torch.tensor(7)}[kind]
    if kind == perm.LISTS:  # partners of e: ids other than e
        t = t + (t >= torch.arange(E)[:, None]).long()
    moved = perm.permute(kind, t, order)
    assert torch.equal(moved, _oracle(kind, t, order.tolist()))
    assert torch.equal(perm.permute(kind, moved, perm.inverse_order(order)), t)
    if kind != perm.SAME:
        assert not torch.equal(moved, t)


def test_the_group_rule_keeps_the_contiguous_blocks_and_moves_any_other_partition():
    order = torch.tensor(ORDERS[0])
    blocks = torch.arange(E) // (E // 2)
    assert perm.is_contiguous_blocks(blocks) and perm.is_contiguous_blocks(torch.zeros(E).long())
    assert torch.equal(perm.permute(perm.GROUPS, blocks, order), blocks)
    explicit = torch.tensor(GROUPS)
    moved = perm.permute(perm.GROUPS, explicit, order)
    assert torch.equal(moved, explicit[order]) and not perm.is_contiguous_blocks(explicit)
    assert torch.equal(perm.permute(perm.GROUPS, moved, perm.inverse_order(order)), explicit)


def test_stacked_tensors_take_one_order_per_layer_and_groups_concatenate_to_the_order():
    t = torch.randn(LAYERS, E, 2)
    moved = perm.permute_stacked(perm.ROWS, t, [torch.tensor(o) for o in ORDERS])
    for layer, order in enumerate(ORDERS):
        assert torch.equal(moved[layer], t[layer][order])
    assert perm.order_from_groups([[3, 1], [0, 2]]) == [3, 1, 0, 2]
    with pytest.raises(ValueError, match="2 layers but 1 orders"):
        perm.permute_stacked(perm.ROWS, t, [torch.tensor(ORDERS[0])])
    with pytest.raises(ValueError, match="not a permutation of 0..3"):
        perm.check_order([0, 1, 1, 3], 4)


def test_a_plans_top_t_lists_relabelled_then_inverse_relabelled_are_the_originals():
    lists = [[(e + d) % E for d in (1, 3)] for e in range(E)]
    plan = _plan([ORDERS[0]], lists=[lists])
    relabelled = torch.tensor(plan.layers[0].top_t_lists_relabelled())
    back = perm.permute(perm.LISTS, relabelled, torch.tensor(_inverse(ORDERS[0])))
    assert back.tolist() == lists and relabelled.tolist() != lists


# ------------------------------------------------------------------------------------------
# Checkpoint key families (no Megatron needed)
# ------------------------------------------------------------------------------------------
def _checkpoint_tensors():
    g = torch.Generator().manual_seed(1)
    p = "decoder.layers.mlp."
    fc1 = torch.randn(LAYERS, E, 4, 3, generator=g)
    lists = torch.stack([torch.stack([torch.tensor([(e + 1) % E, (e + 2) % E]) for e in range(E)])
                         ] * LAYERS)
    return {
        p + "router.weight": torch.randn(LAYERS, E, 3, generator=g),
        p + "router.expert_bias": torch.randn(LAYERS, E, generator=g),
        p + "router.tracker.counts": torch.randint(0, 9, (LAYERS, E, E), generator=g),
        p + "router.tracker.pending": torch.randint(0, 9, (LAYERS, E, E), generator=g),
        p + "router.tracker.tokens": torch.tensor([5, 6]),
        p + "router.top_t_lists": lists,
        p + "router.expert_to_group": torch.tensor([GROUPS, [0] * 4 + [1] * 4]),
        p + "router.constraint_active": torch.tensor([True, True]),
        p + "experts.experts.linear_fc1.weight": fc1,
        "optimizer.state.exp_avg." + p + "experts.experts.linear_fc1.weight": fc1 * 2,
        "optimizer.state.exp_avg_sq." + p + "router.weight": torch.rand(LAYERS, E, 3, generator=g),
        **{f"{p}experts.experts.{e}.linear_fc2.weight": fc1[:, e] * 3 for e in range(E)},
        p + "linear_fc1.layer_norm_weight": torch.randn(LAYERS, 3, generator=g),
        "embedding.word_embeddings.weight": torch.randn(10, 3, generator=g),
    }


def test_checkpoint_tensors_relabelled_then_inverse_relabelled_are_the_originals():
    from megatron_c2r.placement.checkpoint import relabel_tensors

    tensors = _checkpoint_tensors()
    moved = relabel_tensors(tensors, _plan(ORDERS))
    back = relabel_tensors(moved, _plan([_inverse(o) for o in ORDERS]))
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert torch.equal(back[key], t), key
    p = "decoder.layers.mlp."
    e2g = moved[p + "router.expert_to_group"]
    assert torch.equal(e2g[0], torch.tensor(GROUPS)[ORDERS[0]])  # explicit: follows the experts
    assert e2g[1].tolist() == [0] * 4 + [1] * 4  # the contiguous default stays
    for layer, order in enumerate(ORDERS):
        assert torch.equal(moved[p + "router.tracker.pending"][layer],
                           _oracle(perm.PAIRS, tensors[p + "router.tracker.pending"][layer], order))
        assert torch.equal(moved[f"{p}experts.experts.0.linear_fc2.weight"][layer],
                           tensors[f"{p}experts.experts.{order[0]}.linear_fc2.weight"][layer])
        fc1 = f"{p}experts.experts.linear_fc1.weight"
        assert torch.equal(moved[fc1][layer], tensors[fc1][layer][order])
        assert torch.equal(moved["optimizer.state.exp_avg." + fc1][layer], moved[fc1][layer] * 2)


def test_per_expert_checkpoint_objects_move_to_their_new_expert_and_back():
    from megatron_c2r.placement.checkpoint import relabel_objects

    p = "decoder.layers.mlp."
    objects = {f"{p}experts.experts.linear_fc1._extra_state/shard_{l}.{e}_2.8":
               (f"{p}experts.experts.linear_fc1._extra_state", (LAYERS, E), (l, e), f"x{l}{e}")
               for l in range(LAYERS) for e in range(E)}
    objects["o"] = ("decoder.layers.self_attention._extra_state", (LAYERS,), (0,), "attn")
    families = _families(ORDERS)
    moved = relabel_objects(objects, families, drop_optimizer=False)
    by_offset = {v[2]: v[3] for v in moved.values()}
    for layer, order in enumerate(ORDERS):
        for new in range(E):  # new expert i holds old expert order[i]'s object
            assert by_offset[(layer, new)] == f"x{layer}{order[new]}"
    back = relabel_objects(moved, _families([_inverse(o) for o in ORDERS]), drop_optimizer=False)
    assert sorted(back.values()) == sorted(objects.values())


def _families(orders):
    from megatron_c2r.placement.checkpoint import moe_families

    return moe_families({"decoder.layers.mlp.router.weight": (LAYERS, E, 3)}, _plan(orders))


# ------------------------------------------------------------------------------------------
# Live modules (Megatron classes, 1-process gloo pool)
# ------------------------------------------------------------------------------------------
def _router_state(router, opt):
    state = {k: v.clone() for k, v in router.state_dict().items() if torch.is_tensor(v)}
    state["local_tokens_per_expert"] = router.local_tokens_per_expert.clone()
    state["grad"] = router.weight.grad.clone()
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = opt.state[router.weight][key].clone()
    return state


def _router_round_trip():
    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=1)
    config = moe_config(hidden_size=H, num_moe_experts=E, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    router = C2RRouter(config, c2r_config=C2RRouterConfig(mode="c2r", top_t=3,
                                                         expert_to_group=GROUPS))
    router.set_layer_number(1)
    router.set_top_t_lists(torch.stack([torch.tensor([(e + d) % E for d in (1, 3, 4)])
                                        for e in range(E)]))
    router.expert_bias.copy_(torch.randn(E))
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2)
    router.train()
    for step in range(2):
        probs, _ = router(torch.randn(20, 1, H, generator=torch.Generator().manual_seed(step)))
        (probs ** 2).sum().backward()
        opt.step()
        if step == 0:
            router.tracker.reduce_()  # counts and pending both non-zero
    before = _router_state(router, opt)
    order = torch.tensor(ORDERS[0])
    router.relabel_experts_(order, optimizer=opt)
    mid = _router_state(router, opt)
    router.relabel_experts_(perm.inverse_order(order), optimizer=opt)
    after = _router_state(router, opt)
    table = {name: kind for name, kind in perm.ROUTER_STATE.items()}
    table.update(grad=perm.ROWS, exp_avg=perm.ROWS, exp_avg_sq=perm.ROWS)
    expected_mid = {k: _oracle(table[k], v, ORDERS[0]) if table[k] != perm.GROUPS else v[order]
                    for k, v in before.items()}
    return dict(
        round_trip=[k for k in before if not torch.equal(before[k], after[k])],
        mid_wrong=[k for k in before if not torch.equal(mid[k], expected_mid[k])],
        moved=[k for k in before if not torch.equal(before[k], mid[k])],
        keys=sorted(before),
    )


def test_a_live_c2r_router_relabelled_and_back_is_unchanged_and_moves_as_defined(dist_pool):
    (r,) = dist_pool(1).run(_router_round_trip)
    assert r["round_trip"] == [] and r["mid_wrong"] == []
    for name in ("weight", "expert_bias", "top_t_lists", "expert_to_group", "tracker.counts",
                 "tracker.pending", "local_tokens_per_expert", "grad", "exp_avg", "exp_avg_sq"):
        assert name in r["moved"], name


def _experts_round_trip():
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import grouped_gemm_util
    from megatron.core.transformer.moe.experts import GroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_c2r import compat
    from megatron_c2r.placement.relabel import relabel_moe_layer_

    init_parallel(ep=1)
    out = {}
    config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E)
    with megatron_cpu():
        layer = MoELayer(config, compat.moe_submodules(get_moe_module_spec(use_te=False,
                                                                            num_experts=E)))
    grouped_config = moe_config(hidden_size=H, moe_ffn_hidden_size=FFN, num_moe_experts=E,
                                moe_grouped_gemm=True)
    with megatron_cpu(), mock.patch.object(grouped_gemm_util, "assert_grouped_gemm_is_available",
                                           lambda: None):
        grouped = GroupedMLP(E, grouped_config, compat.get_default_pg_collection())
    order = torch.tensor(ORDERS[1])
    for name, module in (("sequential", layer.experts), ("grouped", grouped)):
        for p in module.parameters():
            p.data = torch.randn(p.shape)
            p.grad = torch.randn(p.shape)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        opt.step()

        def snapshot():
            return [t.clone() for p in module.parameters()
                    for t in (p.data, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]

        slots = perm.local_expert_slots(module)
        before = snapshot()
        first = perm.slot_tensors(slots[0], opt)["0.state.exp_avg"].clone()
        perm.permute_slots_(slots, order, opt)
        moved_ok = torch.equal(perm.slot_tensors(slots[order.tolist().index(0)], opt)
                               ["0.state.exp_avg"], first)
        perm.permute_slots_(slots, perm.inverse_order(order), opt)
        out[name] = (all(torch.equal(a, b) for a, b in zip(before, snapshot())), moved_ok)
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    relabel_moe_layer_(layer, order)
    relabel_moe_layer_(layer, perm.inverse_order(order))
    out["layer"] = (all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()), True)
    return out


def test_sequential_and_grouped_experts_with_adamw_state_relabelled_and_back_are_unchanged(
        dist_pool):
    pytest.importorskip("megatron.core.transformer.moe.grouped_gemm_util")
    (r,) = dist_pool(1).run(_experts_round_trip)
    for name, (round_trip, moved_ok) in r.items():
        assert round_trip and moved_ok, name


# ------------------------------------------------------------------------------------------
# Every caller agrees on the same model
# ------------------------------------------------------------------------------------------
def _c2r_gpt(seed):
    """GPTModel, 2 MoE layers of C2R routers (c2r mode, explicit groups, expert bias), every
    kind of router state filled in deterministically from ``seed``."""
    from megatron.core.models.gpt import GPTModel

    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.router import c2r_routers
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=1)
    config = moe_config(num_layers=LAYERS, hidden_size=H, num_moe_experts=E,
                        moe_ffn_hidden_size=FFN, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True)
    router = C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=1, expert_to_group=GROUPS)
    spec = get_c2r_decoder_block_spec(config, C2ROptions(router=router),
                                      use_transformer_engine=False)
    torch.manual_seed(seed)
    with megatron_cpu():
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=32,
                         max_sequence_length=8)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    for layer, r in enumerate(c2r_routers(model)):
        r.set_layer_number(layer + 1)
        r.expert_bias.copy_(torch.randn(E, generator=g))
        r.train()
        r(torch.randn(12, 1, H, generator=g))
        r.step(0)  # warm-up ends: lists derived from the counts, constraint on
        r(torch.randn(12, 1, H, generator=g))
        pending = torch.randint(0, 5, (E, E), generator=g)
        r.tracker.pending.copy_((pending + pending.T).fill_diagonal_(0))  # not yet reduced
    return model


def _tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _callers_agree(tmp):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_c2r import compat
    from megatron_c2r.moe.router import c2r_routers
    from megatron_c2r.placement.checkpoint import convert_checkpoint, relabel_tensors
    from megatron_c2r.placement.relabel import relabel_model_
    from megatron_c2r.placement.replan import relabel_in_run_

    plan = _plan(ORDERS)
    source = _c2r_gpt(seed=3)
    before = _tensors(source)
    in_model = _c2r_gpt(seed=3)
    relabel_model_(in_model, plan)
    in_run = _c2r_gpt(seed=3)
    relabel_model_(in_run, [layer.order for layer in plan.layers], relabel_layer=relabel_in_run_)

    src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
    os.makedirs(src)
    compat.save_dist_checkpoint(source.sharded_state_dict(), src)
    convert_checkpoint(src, plan, out)
    converted = _c2r_gpt(seed=4)
    state = dist_checkpointing.load(converted.sharded_state_dict(), out)
    converted.load_state_dict(state, strict=False)

    def whole(path):
        meta = {k: v for k, v in load_sharded_metadata(path).items()
                if isinstance(v, ShardedTensor)}
        loaded = dist_checkpointing.load(meta, path, validate_access_integrity=False)
        return {v.key: loaded[k] for k, v in meta.items()}

    oracle = relabel_tensors(whole(src), plan)
    written = whole(out)
    relabelled = _tensors(in_model)
    # Saving folds pending tracker counts into counts (C2RRouter.sharded_state_dict reduces the
    # tracker); do the same in memory: relabelling commutes with that sum.
    for model in (in_model, in_run):
        for router in c2r_routers(model):
            router.tracker.reduce_()
    want, got_run, got_ckpt = _tensors(in_model), _tensors(in_run), _tensors(converted)
    return dict(
        run_differs=[k for k in want if not torch.equal(want[k], got_run[k])],
        ckpt_differs=[k for k in want if not torch.equal(want[k], got_ckpt[k])],
        oracle_differs=sorted(k for k in oracle if not torch.equal(oracle[k], written[k])),
        same_keys=set(oracle) == set(written),
        moved=[k for k, v in before.items() if not torch.equal(v, relabelled[k])],
    )


def test_in_model_relabelling_offline_convert_and_in_run_replanning_agree(dist_pool, tmp_path):
    (r,) = dist_pool(1).run(_callers_agree, str(tmp_path))
    assert r["run_differs"] == [] and r["ckpt_differs"] == []
    assert r["oracle_differs"] == [] and r["same_keys"]
    moved = " ".join(r["moved"])
    for part in ("router.weight", "router.expert_bias", "router.top_t_lists",
                 "router.expert_to_group", "router.tracker.counts", "router.tracker.pending",
                 "experts.local_experts.0.linear_fc1.weight"):
        assert part in moved, part


def _replan_orders(num_nodes):
    import numpy as np

    from megatron_c2r.placement.planner import PlannerConfig, plan_layer
    from megatron_c2r.placement.replan import replan_
    from megatron_c2r.placement.sources import LayerCollab

    model = _c2r_gpt(seed=3)
    # Planted co-activation: pairs (0, 5), (2, 7), (1, 4), (3, 6), and pair-of-pairs ties
    # {0,5}-{2,7}, {1,4}-{3,6} a node-first plan keeps on one node.
    counts = np.ones((E, E))
    for a, b, w in ((0, 5, 50), (2, 7, 50), (1, 4, 50), (3, 6, 50), (0, 2, 20), (5, 7, 20),
                    (1, 3, 20), (4, 6, 20)):
        counts[a, b] = counts[b, a] = w
    np.fill_diagonal(counts, 0)
    plans = replan_(model, top_k=2, ep_size=4, counts=[torch.tensor(counts)] * LAYERS,
                    num_nodes=num_nodes)
    offline = plan_layer(LayerCollab.from_counts(counts, 2),
                         PlannerConfig(ep_size=4, seed=0, num_nodes=num_nodes))
    return [list(p.order) for p in plans], list(offline.order)


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_in_run_replanning_plans_nodes_first_like_the_offline_planner(dist_pool, num_nodes):
    (orders, offline) = dist_pool(1).run(_replan_orders, num_nodes)[0]
    assert orders == [offline] * LAYERS  # the in-run plan is the offline planner's, per layer
    if num_nodes == 2:  # each node (4 consecutive experts) holds two tied pairs
        nodes = [set(offline[:4]), set(offline[4:])]
        assert sorted(map(sorted, nodes)) == [[0, 2, 5, 7], [1, 3, 4, 6]]
