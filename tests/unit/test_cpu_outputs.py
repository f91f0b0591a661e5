"""The CPU main job's summary line and plot carry the busiest-rank (and, on simulated nodes,
busiest-node) load over the mean next to rows per token (issue 15 part 5)."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_c2r.cpu import outputs
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig

SUMMARY = dict(
    mode="group", iterations=80, elapsed_s=20.0, train_loss=2.8, val_loss=3.0, ranks_per_token=1.0,
    rows_per_token_alltoall=4.0, row_reduction=4.0, tokens_per_s=7000.0,
    busiest_rank_tokens_over_mean=1.234, busiest_rank_rows_over_mean=1.1,
    busiest_node_tokens_over_mean=1.05, busiest_node_rows_over_mean=1.01,
)  # fmt: skip


def test_summary_line_shows_the_busiest_rank_and_node_only_with_several_nodes():
    one = outputs.summary_line(dict(SUMMARY, nodes=1))
    assert "busiest rank 1.23x mean load (1.10x rows)" in one and "busiest node" not in one
    two = outputs.summary_line(dict(SUMMARY, nodes=2))
    assert "busiest rank 1.23x mean load (1.10x rows), busiest node 1.05x (1.01x rows)" in two
    assert outputs.summary_line(dict(SUMMARY, nodes=1)).endswith("| 7.0k tokens/s")


def test_nodes_come_from_the_simulated_gpus_per_node():
    def cfg(**router):
        return SimpleNamespace(ep_size=4, c2r=C2ROptions(router=C2RRouterConfig(**router)))

    assert outputs._nodes(cfg()) == 1
    assert outputs._nodes(cfg(gpus_per_node=2)) == 2
    assert outputs._nodes(cfg(gpus_per_node=8)) == 1


def test_plot_has_a_balance_panel(tmp_path):
    history = [
        {"iteration": i, "loss": 3.0 - i / 100, "ranks_per_token": 1.5, "rows_per_token_alltoall": 4.0,
         **{name: 1.0 + i / 100 for name in outputs.BALANCE}}
        for i in (1, 10, 20)
    ] + [{"iteration": 21, "loss": 2.7}]  # a step that was not logged: no balance values
    path = outputs.plot_history(history, dict(SUMMARY, nodes=2, warmup_steps=10), str(tmp_path / "p.png"))
    if path is not None:  # matplotlib is an optional extra
        assert (tmp_path / "p.png").stat().st_size > 0
