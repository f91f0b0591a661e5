"""The CPU main job's trainer inside the 2-process gloo pool: it learns, and its gradient
handling matches single-process arithmetic."""

import pytest
import torch

from megatron_c2r.config import C2ROptions
from megatron_c2r.cpu.config import CPUTrainConfig
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
    from megatron_c2r.cpu.train import Trainer

    trainer = Trainer(cfg, torch.distributed.get_rank())
    batch = trainer._batch(trainer.train_ds, 0)
    return [trainer.train_step(i, batch) for i in range(8)]


@pytest.mark.world_size(2)
def test_loss_decreases_on_a_fixed_batch_under_group_routing(dist_pool, tmp_path):
    losses = dist_pool(2).run(_fixed_batch_losses, tiny_config(tmp_path))
    for rank_losses in losses:
        assert rank_losses[-1] < 0.8 * rank_losses[0], rank_losses
