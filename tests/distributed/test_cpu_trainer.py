"""The CPU main job's trainer inside the 2-process gloo pool: it learns, and its gradient
handling matches single-process arithmetic."""

import pytest
import torch

from megatron_c2r.config import C2ROptions
from megatron_c2r.cpu.job_config import CPUTrainConfig
from megatron_c2r.routing.config import C2RRouterConfig


def tiny_config(out_dir, **changes):
    base = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        num_experts=8, topk=2, moe_ffn_hidden_size=32, ep_size=2, seq_length=32,
        micro_batch_size=4, train_iters=40, lr=3e-3, lr_warmup_iters=2, eval_iters=2,
        corpus_bytes=200_000, out_dir=str(out_dir), progress=False, plot=False,
        c2r=C2ROptions(router=C2RRouterConfig(mode="group", warmup_steps=0)),
    )
    base.update(changes)
    return CPUTrainConfig(**base)


def _fixed_batch_losses(cfg):
    from megatron_c2r.cpu.trainer import Trainer

    trainer = Trainer(cfg, torch.distributed.get_rank())
    batch = trainer._batch(trainer.train_ds, 0)
    return [trainer.train_step(i, batch) for i in range(8)]


@pytest.mark.world_size(2)
def test_loss_decreases_on_a_fixed_batch_under_group_routing(dist_pool, tmp_path):
    losses = dist_pool(2).run(_fixed_batch_losses, tiny_config(tmp_path))
    for rank_losses in losses:
        assert rank_losses[-1] < 0.8 * rank_losses[0], rank_losses


def _train_with_refresh(cfg):
    from megatron_c2r.cpu.trainer import Trainer
    from megatron_c2r.moe.router import c2r_routers

    trainer = Trainer(cfg, torch.distributed.get_rank())
    trainer.train()
    groups = [r.c2r_metrics()["groups_per_token"] for r in c2r_routers(trainer.model)]
    return trainer.placements, groups


@pytest.mark.world_size(2)
def test_refresh_interval_replans_the_placement_from_plain_topk_preference(dist_pool, tmp_path):
    router = C2RRouterConfig(mode="group", max_groups=1, warmup_steps=8, refresh_interval=8)
    cfg = tiny_config(tmp_path, train_iters=30, c2r=C2ROptions(router=router))
    (placements, groups), (placements_1, _) = dist_pool(2).run(_train_with_refresh, cfg)
    assert [p["iteration"] for p in placements] == [8, 16, 24]
    assert [p["orders"] for p in placements] == [p["orders"] for p in placements_1]
    for p in placements[1:]:
        for layer in p["predicted_ranks_per_token"]:
            # Counted from the constrained map, the current placement would predict exactly 1.
            assert layer["identity"] > 1.05, layer
            assert layer["planned"] <= layer["identity"] + 1e-6, layer
    assert all(abs(g - 1.0) < 1e-6 for g in groups), groups
