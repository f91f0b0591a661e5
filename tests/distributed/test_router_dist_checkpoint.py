"""C2RRouter state through Megatron's distributed checkpointing (torch_dist), TP=2 x EP=2.

Four gloo processes build a real GPTModel whose MoE layers carry C2R routers (our spec builder,
dedup dispatcher), put every kind of router state in place (0-d bool ``constraint_active``,
top-T lists [E, L] or the empty [E, 0] of group mode, a non-default ``expert_to_group``, the
fp32 [G] group bias, the tracker's reduced counts and per-rank pending counts), save ``model.sharded_state_dict()`` with
``dist_checkpointing`` and load it into a freshly initialised model. The reloaded routers must hold
the same buffers and route the same tokens to the same experts, and the tracker counts of the
whole TP x DP group: saving sums the per-rank pending counts into them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config

E, K, H = 8, 2, 32
# A non-default balanced partition into EP=2 groups (default: [0,0,0,0,1,1,1,1]).
GROUPS = [1, 0, 1, 0, 0, 1, 0, 1]


def _model(mode: str, seed: int):
    from megatron.core.models.gpt import GPTModel

    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec
    from megatron_c2r.routing.config import C2RRouterConfig

    config = moe_config(num_layers=2, hidden_size=H, num_moe_experts=E, moe_router_topk=K,
                        tensor_model_parallel_size=2, expert_model_parallel_size=2)
    router = (C2RRouterConfig(mode="c2r", top_t=3, warmup_steps=1) if mode == "c2r" else
              C2RRouterConfig(mode="group", max_groups=1, warmup_steps=1, expert_to_group=GROUPS,
                              group_bias_rate=1e-3))
    spec = get_c2r_decoder_block_spec(config, C2ROptions(router=router), use_transformer_engine=False)
    torch.manual_seed(seed)
    with megatron_cpu():
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64,
                        max_sequence_length=16)


def _routers(model):
    from megatron_c2r.moe.router import c2r_routers

    return list(c2r_routers(model))


def _tokens(seed: int):
    return torch.randn(12, 2, H, generator=torch.Generator().manual_seed(seed))


def _state(router):
    extra = {} if router.group_bias is None else {"group_bias": router.group_bias.clone()}
    return {
        **extra,
        "constraint_active": router.constraint_active.clone(),
        "top_t_lists": router.top_t_lists.clone(),
        "expert_to_group": router.expert_to_group.clone(),
        "counts": router.tracker.counts.clone(),
        "tokens": router.tracker.tokens.clone(),
        "pending": router.tracker.pending.clone(),
        "pending_tokens": router.tracker.pending_tokens.clone(),
    }


def _save_and_load(mode: str, ckpt_dir: str):
    from megatron.core import dist_checkpointing

    from megatron_c2r import compat

    init_parallel(ep=2, tp=2)
    rank = dist.get_rank()
    source = _model(mode, seed=1)
    for layer, router in enumerate(_routers(source)):
        router.train()
        router.set_layer_number(layer + 1)
        router(_tokens(10 * layer + rank // 2))  # DP ranks see different tokens
        router.step(0)  # warm-up ends: tracker summed over TP x DP, lists derived, active
        router(_tokens(100 + 10 * layer + rank))  # pending counts that differ per rank
        if router.group_bias is not None:  # fp32 [G] group-choice offsets (group mode)
            router.group_bias.copy_(torch.tensor([0.25, -0.5]) + layer)
    source.eval()
    with torch.no_grad():
        want_maps = [r(_tokens(7))[1] for r in _routers(source)]
    want = [_state(r) for r in _routers(source)]

    compat.save_dist_checkpoint(source.sharded_state_dict(), ckpt_dir)
    dist.barrier()
    fresh = _model(mode, seed=2)
    assert not any(bool(r.constraint_active) for r in _routers(fresh))
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir)
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    router_keys_missing = [k for k in missing if ".router." in k]
    got = [_state(r) for r in _routers(fresh)]
    fresh.eval()
    with torch.no_grad():
        got_maps = [r(_tokens(7))[1] for r in _routers(fresh)]
    host_active = [r._active for r in _routers(fresh)]
    return dict(rank=rank, want=want, got=got, want_maps=want_maps, got_maps=got_maps,
                host_active=host_active, router_keys_missing=router_keys_missing,
                unexpected=list(unexpected))


@pytest.mark.world_size(4)
@pytest.mark.parametrize("mode", ["c2r", "group"])
def test_router_state_round_trips_through_torch_dist_with_tp2_ep2(dist_pool, tmp_path, mode):
    (tmp_path / "ckpt").mkdir()
    results = dist_pool(4).run(_save_and_load, mode, str(tmp_path / "ckpt"))
    for r in results:
        assert not r["router_keys_missing"] and not r["unexpected"], r
        assert all(r["host_active"]), "the host mirror of constraint_active must follow the load"
        for layer, (want, got) in enumerate(zip(r["want"], r["got"])):
            for name in ("constraint_active", "top_t_lists", "expert_to_group", "counts", "tokens"):
                assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
            for name in ("constraint_active", "top_t_lists", "expert_to_group"):
                assert torch.equal(want[name], got[name]), (r["rank"], layer, name)
            if mode == "group":
                assert got["group_bias"].dtype == torch.float32
                assert torch.equal(got["group_bias"], torch.tensor([0.25, -0.5]) + layer)
            assert bool(got["constraint_active"]) and int(got["tokens"]) > 0
            if mode == "c2r":
                assert got["top_t_lists"].shape == (E, 3)
            else:
                assert got["top_t_lists"].shape == (E, 0)
                assert got["expert_to_group"].tolist() == GROUPS
        for want_map, got_map in zip(r["want_maps"], r["got_maps"]):
            assert torch.equal(want_map, got_map), "the reloaded router routes differently"
    # Pending tracker counts are per rank; saving sums them over TP x DP (here all 4 ranks) into
    # the replicated counts, so every rank -- and a resumed run's planner -- gets the whole
    # group's counts back, and nothing is pending.
    assert not torch.equal(results[0]["want"][0]["pending"], results[1]["want"][0]["pending"])
    for layer in range(len(results[0]["want"])):
        whole = results[0]["want"][layer]["counts"] + sum(r["want"][layer]["pending"] for r in results)
        whole_tokens = results[0]["want"][layer]["tokens"] + sum(r["want"][layer]["pending_tokens"] for r in results)
        assert int(whole.sum()) > int(results[0]["want"][layer]["counts"].sum())
        for r in results:
            got = r["got"][layer]
            assert torch.equal(got["counts"], whole), (r["rank"], layer)
            assert torch.equal(got["tokens"], whole_tokens), (r["rank"], layer)
            assert not got["pending"].any() and int(got["pending_tokens"]) == 0
