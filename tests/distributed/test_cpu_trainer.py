"""The CPU main job's trainer inside the 2-process gloo pool: it learns, and its gradient
handling matches single-process arithmetic."""

import pytest
import torch

from megatron_c2r.cpu.job_config import CPUTrainConfig
from megatron_c2r.moe.options import C2ROptions
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


def _save_every_step_then_resume(cfg):
    import os

    import numpy as np

    from megatron_c2r.cpu import checkpoint
    from megatron_c2r.cpu.trainer import Trainer

    rank = torch.distributed.get_rank()
    trainer = Trainer(cfg, rank)
    trainer.train(exit_after=5)
    root = checkpoint.root_of(cfg.out_dir)
    kept = sorted(os.listdir(root))
    complete, problems = checkpoint.scan(root)
    # A new process state: build again, load the newest complete checkpoint, compare.
    resumed = Trainer(cfg, rank)
    resumed.load_checkpoint(complete[0])
    saved, loaded = trainer.model.state_dict(), resumed.model.state_dict()
    same_state = saved.keys() == loaded.keys() and all(
        torch.equal(saved[k], loaded[k]) if torch.is_tensor(saved[k]) else saved[k] == loaded[k]
        for k in saved)
    next_losses = (trainer.train_step(5), resumed.train_step(5))
    counts_LEE = np.load(os.path.join(cfg.out_dir, checkpoint.COLLAB_FILE), allow_pickle=False)
    tracker_LEE = np.stack([r.tracker.counts.numpy() for r in _routers(trainer)])
    return dict(kept=kept, problems=problems, meta=complete[0].meta, same_state=same_state,
                next_losses=next_losses, counts_LEE=counts_LEE, tracker_LEE=tracker_LEE,
                history=[r["iteration"] for r in resumed.history], segments=resumed.segments)


def _routers(trainer):
    from megatron_c2r.moe.router import c2r_routers

    return list(c2r_routers(trainer.model))


@pytest.mark.world_size(2)
def test_checkpoints_every_step_keep_the_last_two_complete_and_resume_to_the_same_state(
        dist_pool, tmp_path):
    import os

    cfg = tiny_config(tmp_path, train_iters=8, save_interval=1,
                      c2r=C2ROptions(router=C2RRouterConfig(mode="group", warmup_steps=3)))
    results = dist_pool(2).run(_save_every_step_then_resume, cfg)
    r0, r1 = results
    assert r0["kept"] == ["iter_0000004", "iter_0000005"] == r1["kept"]
    assert r0["problems"] == []
    files = r0["meta"]["files"]
    assert sorted(files) == ["rank0.pt", "rank1.pt"]
    for name, size in files.items():
        assert os.path.getsize(os.path.join(tmp_path, "checkpoint", "iter_0000005", name)) == size
    for r in results:
        assert r["same_state"]
        assert r["next_losses"][0] == r["next_losses"][1]
    # The trackers' counts, summed over ranks at the save, in the model's labelling; `plan` reads it.
    assert r0["counts_LEE"].shape == (2, 8, 8) and r0["counts_LEE"].dtype.kind == "i"
    assert (r0["counts_LEE"] == r0["tracker_LEE"]).all() and r0["counts_LEE"].sum() > 0
    assert r0["history"] == [1, 2, 3, 4, 5] and r1["history"] == []  # rank 0 keeps the history
    assert [(s["start"], s["end"]) for s in r0["segments"]] == [(0, 5)]
