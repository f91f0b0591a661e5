"""Offline checkpoint conversion: a small CPU GPTModel (2 MoE layers, expert bias) saves a
torch_dist checkpoint through megatron.core.dist_checkpointing; `megatron-c2r convert` relabels
it; a fresh model loads the result and every MoE layer computes the same outputs.
Runs in the session's 1-process gloo pool (dist_checkpointing needs a process group)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

E, H, LAYERS = 8, 32, 2
ORDERS = [[5, 2, 7, 0, 1, 6, 3, 4], [1, 0, 3, 2, 5, 4, 7, 6]]


def _model(seed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    init_parallel(ep=1)
    cfg = moe_config(num_layers=LAYERS, hidden_size=H, num_moe_experts=E,
                     moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    torch.manual_seed(seed)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
        num_experts=E, moe_grouped_gemm=False), vocab_size=64, max_sequence_length=16)
    g = torch.Generator().manual_seed(seed)
    for layer in model.decoder.layers:
        layer.mlp.router.expert_bias.copy_(torch.randn(E, generator=g))
        for p in layer.mlp.experts.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model


def _moe_outputs(model):
    x = torch.randn(10, 2, H, generator=torch.Generator().manual_seed(99))
    return [layer.mlp(x)[0].detach() for layer in model.decoder.layers]


def _plan(orders, num_experts=E):
    from megatron_c2r.placement.plan_file import Plan, PlanLayer

    layers = []
    for i, order in enumerate(orders):
        groups = [order[: num_experts // 2], order[num_experts // 2:]]
        e2r = [0 if e in groups[0] else 1 for e in range(num_experts)]
        layers.append(PlanLayer(i, groups, e2r, {}))
    return Plan(num_experts=num_experts, ep_size=2, top_k=2, layers=layers)


def _save_megatron_lm_layout(model, root, iteration):
    from megatron_c2r import compat

    iter_dir = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(iter_dir)
    sharded = model.sharded_state_dict()
    sharded["iteration"] = iteration
    compat.save_dist_checkpoint(sharded, iter_dir)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _convert_and_reload(tmp):
    from megatron.core import dist_checkpointing

    from megatron_c2r.cli import main
    from megatron_c2r.placement.plan_file import write_plan

    with megatron_cpu():
        src_model = _model(seed=1)
        want = _moe_outputs(src_model)
        src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        _save_megatron_lm_layout(src_model, src, iteration=5)
        write_plan(_plan(ORDERS), os.path.join(tmp, "plan.json"))
        rc = main(["convert", "--load", src, "--plan", os.path.join(tmp, "plan.json"),
                   "--save", out])
        fresh = _model(seed=2)
        ckpt = os.path.join(out, "iter_0000005")
        state = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt)
        state.pop("iteration")  # common (non-sharded) entries come back too
        fresh.load_state_dict(state)
        got = _moe_outputs(fresh)
        common = dist_checkpointing.load_common_state_dict(ckpt)
        routers = [
            float((b.mlp.router.weight - a.mlp.router.weight[order]).abs().max())
            for a, b, order in zip(src_model.decoder.layers, fresh.decoder.layers, ORDERS)
        ]
    return dict(
        rc=rc,
        out_err=max(float((g - w).abs().max()) for g, w in zip(got, want)),
        scale=max(float(w.abs().max()) for w in want),
        router_err=max(routers),
        embedding_equal=bool(torch.equal(fresh.embedding.word_embeddings.weight,
                                         src_model.embedding.word_embeddings.weight)),
        iteration=common.get("iteration"),
        tracker=open(os.path.join(out, "latest_checkpointed_iteration.txt")).read(),
    )


def test_a_converted_checkpoint_reloads_into_a_model_with_the_same_moe_outputs(dist_pool,
                                                                                tmp_path):
    (r,) = dist_pool(1).run(_convert_and_reload, str(tmp_path))
    assert r["rc"] == 0
    assert r["out_err"] <= 1e-6 * max(1.0, r["scale"])
    assert r["router_err"] == 0.0 and r["embedding_equal"]
    assert r["iteration"] == 5 and r["tracker"] == "5"


def _bad_inputs(tmp):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_c2r import compat
    from megatron_c2r.cli import main
    from megatron_c2r.placement.checkpoint import convert_checkpoint
    from megatron_c2r.placement.plan_file import write_plan

    errors = {}
    with megatron_cpu():
        src = os.path.join(tmp, "src")
        _save_megatron_lm_layout(_model(seed=1), src, iteration=1)
        for name, plan, save in [
            ("other_e", _plan([list(range(16))] * LAYERS, num_experts=16), "o1"),
            ("other_layers", _plan(ORDERS[:1]), "o2"),
        ]:
            try:
                convert_checkpoint(src, plan, os.path.join(tmp, save))
            except ValueError as exc:
                errors[name] = (str(exc), os.path.exists(os.path.join(tmp, save)))
        dense = os.path.join(tmp, "dense")
        os.makedirs(dense)
        compat.save_dist_checkpoint(
            {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3), replica_id=0)}, dense)
        try:
            convert_checkpoint(dense, _plan(ORDERS), os.path.join(tmp, "o3"))
        except ValueError as exc:
            errors["no_moe"] = (str(exc), os.path.exists(os.path.join(tmp, "o3")))
        write_plan(_plan(ORDERS), os.path.join(tmp, "plan.json"))
        os.makedirs(os.path.join(tmp, "taken"))
        open(os.path.join(tmp, "taken", "x"), "w").close()
        errors["cli_rc_save_taken"] = main(["convert", "--load", src, "--plan",
                                            os.path.join(tmp, "plan.json"), "--save",
                                            os.path.join(tmp, "taken")])
        errors["leftovers"] = sorted(n for n in os.listdir(tmp) if n.startswith(".c2r"))
    return errors


def test_bad_conversions_fail_with_one_line_errors_and_write_nothing(dist_pool, tmp_path):
    (r,) = dist_pool(1).run(_bad_inputs, str(tmp_path))
    msg, written = r["other_e"]
    assert "num_experts=16" in msg and "has 8" in msg and not written
    msg, written = r["other_layers"]
    assert "1 layers" in msg and "2 MoE layers" in msg and not written
    msg, written = r["no_moe"]
    assert "no MoE layers" in msg and not written
    assert all("\n" not in r[k][0] for k in ("other_e", "other_layers", "no_moe"))
    assert r["cli_rc_save_taken"] == 2 and r["leftovers"] == []


def test_a_directory_that_is_not_a_torch_dist_checkpoint_is_refused(tmp_path):
    from megatron_c2r.placement.checkpoint import resolve_checkpoint

    (tmp_path / "mp_rank_00").mkdir()
    with pytest.raises(ValueError, match="legacy per-rank checkpoint"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing"))


def test_key_rules_relabel_optimizer_copies_singleton_keys_and_c2r_router_state():
    """relabel_tensors on hand-built key families (no Megatron needed): each rule against the
    definition new[i] = old[order[i]], per layer."""
    from megatron_c2r.placement.checkpoint import relabel_tensors

    g = torch.Generator().manual_seed(0)
    p = "decoder.layers.mlp."
    fc1 = torch.randn(LAYERS, E, 4, 3, generator=g)
    counts = torch.randint(0, 9, (LAYERS, E, E), generator=g)
    lists = torch.stack([torch.stack([torch.tensor([(e + 1) % E, (e + 2) % E]) for e in range(E)])
                         ] * LAYERS)
    tensors = {
        p + "router.weight": torch.randn(LAYERS, E, 3, generator=g),
        p + "router.tracker.counts": counts,
        p + "router.top_t_lists": lists,
        p + "router.expert_to_group": torch.arange(E).repeat(LAYERS, 1) // 4,
        p + "router.constraint_active": torch.tensor([True, True]),
        p + "experts.experts.linear_fc1.weight": fc1,
        "optimizer.state.exp_avg." + p + "experts.experts.linear_fc1.weight": fc1 * 2,
        **{f"{p}experts.experts.{e}.linear_fc2.weight": fc1[:, e] * 3 for e in range(E)},
        p + "linear_fc1.layer_norm_weight": torch.ones(LAYERS, 3),
    }
    out = relabel_tensors(tensors, _plan(ORDERS))
    for l, order in enumerate(ORDERS):
        o = torch.tensor(order)
        inverse = torch.argsort(o)
        assert torch.equal(out[p + "experts.experts.linear_fc1.weight"][l], fc1[l][o])
        assert torch.equal(out["optimizer.state.exp_avg." + p + "experts.experts.linear_fc1.weight"][l],
                           2 * fc1[l][o])
        for i in range(E):
            assert torch.equal(out[f"{p}experts.experts.{i}.linear_fc2.weight"][l],
                               3 * fc1[l, order[i]])
        assert torch.equal(out[p + "router.tracker.counts"][l], counts[l][o][:, o])
        assert torch.equal(out[p + "router.top_t_lists"][l], inverse[lists[l][o]])
    assert torch.equal(out[p + "router.expert_to_group"], tensors[p + "router.expert_to_group"])
    assert torch.equal(out[p + "linear_fc1.layer_norm_weight"], torch.ones(LAYERS, 3))

    flat = dict(tensors, **{"optimizer.distributed.dp_group_idx_0.gbuf_idx_0.param": torch.ones(9)})
    with pytest.raises(ValueError, match="--drop-optimizer"):
        relabel_tensors(flat, _plan(ORDERS))
    dropped = relabel_tensors(flat, _plan(ORDERS), drop_optimizer=True)
    assert not any(k.startswith("optimizer") for k in dropped)
    unknown = dict(tensors, **{p + "router.mystery": torch.ones(LAYERS, E)})
    with pytest.raises(ValueError, match="unknown router state"):
        relabel_tensors(unknown, _plan(ORDERS))


def test_chained_optimizer_keys_flat_buckets_and_unknown_layouts_are_recognised_first():
    """ChainedOptimizer keys ("chained_<i>.optimizer...") follow the same rules; flat
    DistributedOptimizer buckets are refused naming the save flag; a tensor under an MoE key
    without the family's layer / expert axes is refused instead of being mis-permuted."""
    from megatron_c2r.placement.checkpoint import relabel_tensors

    p = "decoder.layers.mlp."
    weight = torch.randn(LAYERS, E, 3)
    chained = {p + "router.weight": weight,
               "chained_0.optimizer.state.exp_avg." + p + "router.weight": weight * 2}
    out = relabel_tensors(chained, _plan(ORDERS))
    for l, order in enumerate(ORDERS):
        assert torch.equal(out["chained_0.optimizer.state.exp_avg." + p + "router.weight"][l],
                           2 * weight[l][order])
    bucket = ("chained_1.optimizer.distributed.dp_group_idx_0.gbuf_idx_0."
              "dtype_(torch.float32, torch.float32).bucket_idx_0.param")
    flat = dict(chained, **{bucket: torch.ones(9)})
    with pytest.raises(ValueError, match="dp_reshardable.*--dist-ckpt-optim-fully-reshardable"):
        relabel_tensors(flat, _plan(ORDERS))
    dropped = relabel_tensors(flat, _plan(ORDERS), drop_optimizer=True)
    assert list(dropped) == [p + "router.weight"]
    odd = {p + "router.weight": weight, "optimizer.state.exp_avg." + p + "router.weight": weight[0]}
    with pytest.raises(ValueError, match=r"has shape \(8, 3\), expected \[2 layers, 8 experts"):
        relabel_tensors(odd, _plan(ORDERS))
