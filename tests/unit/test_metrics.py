"""The metrics owner: pure routing statistics, and record -> report -> reset on real MoE layers
reaching TensorBoard event files and CSV with the documented names."""

import csv

import pytest
import torch

from megatron_c2r.metrics.report import LOAD_NAMES, C2RMetrics, console_line, routing_stats
from megatron_c2r.metrics.stats import busiest_over_mean, routing_loads
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.routing.config import C2RRouterConfig
from tests.megatron_cpu import init_parallel, megatron_cpu, moe_config


def test_routing_stats_of_a_hand_made_map_match_the_definitions():
    # 4 experts on 2 EP ranks ({0,1} on rank 0, {2,3} on rank 1); top-2; this is rank 0.
    rmap = torch.tensor(
        [[1, 1, 0, 0],   # both on rank 0: 1 rank, 1 intra-group pair
         [1, 0, 1, 0],   # ranks 0 and 1: 2 ranks, cross pair
         [0, 0, 1, 1],   # rank 1 only
         [0, 1, 0, 1]],  # ranks 0 and 1
        dtype=torch.bool,
    )
    s = {k: float(v) for k, v in routing_stats(rmap, ep_size=2, ep_rank=0).items()}
    assert s["ranks_per_token"] == pytest.approx(6 / 4)
    assert s["rows_per_token_alltoall"] == pytest.approx(2.0)
    assert s["row_reduction"] == pytest.approx(2.0 / 1.5)
    assert s["remote_fraction"] == pytest.approx(3 / 6)  # rows to rank 1: tokens 1, 2, 3
    assert s["intra_group_share"] == pytest.approx(2 / 4)
    assert s["tokens_per_expert_max_over_mean"] == pytest.approx(1.0)  # 2 tokens per expert
    assert s["tokens_per_expert_cv"] == pytest.approx(0.0)
    assert s["overload_factor"] == pytest.approx(1.0)


def test_routing_stats_skip_padding_and_measure_overload():
    rmap = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    padding = torch.tensor([False, False, True])
    s = {k: float(v) for k, v in routing_stats(rmap, ep_size=2, padding_T=padding).items()}
    assert s["ranks_per_token"] == 1.0 and s["remote_fraction"] == 0.0
    assert s["overload_factor"] == pytest.approx(2.0)  # rank 0 gets all 4 assignments
    assert s["intra_group_share"] == 1.0


def test_routing_stats_mask_padding_exactly_like_dropping_the_padded_tokens():
    g = torch.Generator().manual_seed(0)
    top_TK = torch.rand(40, 16, generator=g).topk(4, dim=1).indices
    rmap = torch.zeros(40, 16, dtype=torch.bool).scatter(1, top_TK, True)
    padding = torch.rand(40, generator=g) < 0.3
    groups = torch.randperm(16, generator=g) % 4
    kwargs = dict(ep_size=4, ep_rank=1, expert_to_group_E=groups, num_groups=4)
    masked = routing_stats(rmap, padding_T=padding.view(8, 5), **kwargs)
    dropped = routing_stats(rmap[~padding], **kwargs)
    assert masked.keys() == dropped.keys()
    for name in masked:
        assert torch.equal(masked[name], dropped[name]), name


def test_routing_stats_need_num_groups_with_a_group_map():
    with pytest.raises(ValueError, match="pass num_groups"):
        routing_stats(
            torch.ones(2, 4, dtype=torch.bool), ep_size=2, expert_to_group_E=torch.arange(4) // 2
        )


@pytest.fixture(scope="module")
def moe_layers(megatron_world1):
    """Two real MoE layers (layer numbers 1 and 2) built from our spec: C2R router, dedup layer."""
    from megatron_c2r.compat import build_from_spec
    from megatron_c2r.moe.spec_builders import get_c2r_decoder_block_spec

    init_parallel()
    torch.manual_seed(0)
    config = moe_config(num_layers=2)
    options = C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1))
    block = get_c2r_decoder_block_spec(config, options, use_transformer_engine=False)
    with megatron_cpu():
        layers = torch.nn.ModuleList(
            build_from_spec(spec.submodules.mlp, config=config, layer_number=i + 1)
            for i, spec in enumerate(block.layer_specs)
        )
    for i, layer in enumerate(layers):
        layer.set_layer_number(i + 1)
    return config, layers


def run_forward(config, layers):
    hidden = torch.randn(8, 2, config.hidden_size)  # [S, B, H]
    with megatron_cpu():
        for layer in layers:
            out, _ = layer(hidden)
            out.sum().backward()


def test_metrics_reach_a_tensorboard_event_file_and_a_csv_with_the_documented_names(moe_layers, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    config, layers = moe_layers
    metrics = C2RMetrics().attach(layers)
    layers.train()
    run_forward(config, layers)
    metrics.record(layers)
    writer = SummaryWriter(str(tmp_path / "tb"))
    lines = []
    values = metrics.report(7, tb_writer=writer, csv_path=str(tmp_path / "m.csv"), print_fn=lines.append)
    writer.close()
    metrics.detach()

    expected = {"moe/c2r/ranks_per_token", "moe/c2r/ranks_per_token_layer_0",
                "moe/c2r/ranks_per_token_layer_1", "moe/c2r/rows_per_token_alltoall",
                "moe/c2r/overload_factor", "moe/c2r/tokens_per_expert_cv",
                "moe/c2r/groups_per_token", "moe/c2r/violation_rate"}
    assert expected <= set(values)
    # EP=1: every token is on the one rank; alltoall would still ship k=2 rows.
    assert values["moe/c2r/ranks_per_token"] == 1.0
    assert values["moe/c2r/rows_per_token_alltoall"] == 2.0
    assert values["moe/c2r/violation_rate"] == 0.0

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
    assert events.Scalars("moe/c2r/ranks_per_token")[0].step == 7
    with open(tmp_path / "m.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["metric"] for r in rows} == set(values) and {r["iteration"] for r in rows} == {"7"}
    assert lines and lines[0].startswith(" iteration        7 | moe/c2r ranks_per_token 1")


def test_reset_forgets_records_and_eval_forwards_are_not_recorded(moe_layers):
    config, layers = moe_layers
    metrics = C2RMetrics().attach(layers)
    layers.train()
    run_forward(config, layers)
    assert metrics.compute()
    metrics.reset()
    assert metrics.compute() == {}
    layers.eval()
    with torch.no_grad(), megatron_cpu():
        layers[0](torch.randn(4, 1, config.hidden_size))
    assert metrics.compute() == {}
    metrics.recording = False
    layers.train()
    run_forward(config, layers)
    assert metrics.compute() == {}
    metrics.detach()


def test_console_line_shows_layer_means_only():
    line = console_line(3, {"moe/c2r/a": 1.0, "moe/c2r/a_layer_0": 1.0, "moe/c2r/b": 0.25})
    assert line == " iteration        3 | moe/c2r a 1 | b 0.25"


# ---- busiest-over-mean loads ---------------------------------------------------------------
def brute_loads(maps, ep_size, ranks_per_node):
    """Per destination EP rank and node: (token, expert) pairs and distinct tokens received
    from every map in ``maps`` (one per source rank and record), by loops."""
    E = maps[0].shape[1]
    L, D = E // ep_size, ep_size // ranks_per_node
    tokens_P, rows_P, tokens_D, rows_D = [0] * ep_size, [0] * ep_size, [0] * D, [0] * D
    for rmap in maps:
        for row in rmap.tolist():
            experts = [e for e, used in enumerate(row) if used]
            for p in {e // L for e in experts}:
                rows_P[p] += 1
            for d in {e // L // ranks_per_node for e in experts}:
                rows_D[d] += 1
            for e in experts:
                tokens_P[e // L] += 1
                tokens_D[e // L // ranks_per_node] += 1
    loads = (tokens_P, rows_P, tokens_D, rows_D)
    return {name: max(v) / (sum(v) / len(v)) for name, v in zip(LOAD_NAMES, loads)}


def random_map(T, E, k, seed, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g) + skew * torch.linspace(0, 1, E)  # skew: late experts
    return torch.zeros(T, E, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)


def test_routing_loads_of_a_hand_made_map_and_padding():
    # 8 experts on 4 ranks (2 each), 2 ranks per node; rank 0 and node 0 busiest.
    rmap = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 0, 1, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 1, 0, 0, 1],
                         [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # fmt: skip
    loads = routing_loads(rmap, ep_size=4, ranks_per_node=2)
    assert loads.dtype == torch.float64 and loads.shape == (4, 6)
    assert loads[0].tolist() == [5, 3, 3, 3, 4, 1]  # (token, expert) pairs per rank; P=4; 1 record
    assert loads[1].tolist() == [3, 2, 2, 2, 4, 1]  # distinct tokens per rank
    assert loads[2].tolist() == [8, 6, 0, 0, 2, 1]  # per node, D=2
    assert loads[3].tolist() == [3, 2, 0, 0, 2, 1]
    assert busiest_over_mean(loads[0].tolist()) == pytest.approx(5 / (14 / 4))
    assert busiest_over_mean(loads[3].tolist()) == pytest.approx(3 / 2.5)
    padded = routing_loads(rmap, ep_size=4, ranks_per_node=2, padding_T=torch.tensor([0, 0, 0, 1]).bool())
    assert torch.equal(padded, routing_loads(rmap[:3], ep_size=4, ranks_per_node=2))
    unknown = routing_loads(rmap, ep_size=4)  # nodes unknown: node rows hold no slots
    assert unknown[2:].tolist() == [[0, 0, 0, 0, 0, 1]] * 2
    assert busiest_over_mean(unknown[2].tolist()) is None
    assert busiest_over_mean([0.0] * 6) is None


@pytest.mark.parametrize("skew", [0.0, 0.5])
def test_busiest_over_mean_of_summed_records_equals_brute_force(skew):
    maps = [random_map(37, 16, 4, seed, skew) for seed in range(3)]
    metrics = C2RMetrics(num_layers=2)
    for rmap in maps:
        metrics.add_loads(1, routing_loads(rmap, ep_size=8, ranks_per_node=2))
    values = metrics.compute()
    want = brute_loads(maps, ep_size=8, ranks_per_node=2)
    for name in LOAD_NAMES:
        assert values[f"moe/c2r/{name}_layer_1"] == pytest.approx(want[name], rel=1e-12), name
        assert values[f"moe/c2r/{name}"] == values[f"moe/c2r/{name}_layer_1"]  # one layer
    assert "moe/c2r/busiest_rank_tokens_over_mean_layer_0" not in values  # nothing recorded
    if skew:
        assert values["moe/c2r/busiest_rank_tokens_over_mean"] > 1.2


def test_real_layers_record_loads_in_the_router_hook(moe_layers):
    config, layers = moe_layers
    metrics = C2RMetrics().attach(layers)
    layers.train()
    run_forward(config, layers)
    values = metrics.compute()
    metrics.detach()
    assert metrics.ep_size == 1 and all(layer.topology.num_nodes == 1 for layer in layers)
    for name in LOAD_NAMES:  # one rank on one node: busiest = mean
        assert values[f"moe/c2r/{name}_layer_0"] == values[f"moe/c2r/{name}_layer_1"] == 1.0
