"""The group-level balance losses are logged like Megatron's own aux loss: summed over TP x CP,
then averaged over data-parallel ranks by Megatron's tracker reduction, not the last rank's
value (2 gloo processes, DP = 2, real C2R routers)."""

import pytest
import torch
import torch.distributed as dist

from tests.megatron_cpu import init_parallel, moe_config

NAMES = ("load_balancing_loss", "device_balance_loss", "comm_balance_loss")


def _log_and_reduce():
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from megatron_c2r.moe.router import C2RRouter
    from megatron_c2r.routing.config import C2RRouterConfig

    init_parallel(ep=1)  # 2 ranks: DP = 2
    torch.manual_seed(0)  # same weights on both ranks, as after DP's broadcast
    cfg = C2RRouterConfig(mode="group", num_groups=4, max_groups=2, device_balance_coeff=0.05,
                          comm_balance_coeff=0.02)
    router = C2RRouter(moe_config(num_moe_experts=16, moe_router_topk=4, moe_aux_loss_coeff=1e-2),
                       c2r_config=cfg)
    router.set_layer_number(1)
    router.train()
    torch.nn.init.normal_(router.weight, std=0.5)
    rank = dist.get_rank()
    clear_aux_losses_tracker()
    x = torch.randn(16 * (rank + 1), 2, 32, generator=torch.Generator().manual_seed(rank))
    router(x)  # each DP rank its own tokens (and token count)
    tracker = get_moe_layer_wise_logging_tracker()
    local = {name: tracker[name]["values"][0].clone() for name in NAMES}
    reduce_aux_losses_tracker_across_ranks()
    reduced = {name: tracker[name]["values"][0].clone() for name in NAMES}
    clear_aux_losses_tracker()
    return local, reduced


@pytest.mark.world_size(2)
def test_balance_losses_are_averaged_over_data_parallel_ranks_like_megatrons_aux_loss(dist_pool):
    results = dist_pool(2).run(_log_and_reduce)
    (local0, reduced0), (local1, reduced1) = results
    for name in NAMES:
        assert not torch.equal(local0[name], local1[name]), name  # the ranks saw different tokens
        mean = (local0[name] + local1[name]) / 2
        torch.testing.assert_close(reduced0[name], mean)
        torch.testing.assert_close(reduced1[name], mean)
