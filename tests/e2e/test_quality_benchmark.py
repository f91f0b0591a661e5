"""``benchmarks/quality.py`` end to end on two short real runs of the CPU main job, and its
paired-by-seed arithmetic."""

from __future__ import annotations

import json
import math
import shutil

from benchmarks.quality import SHAPES, markdown_table, routings, summarize, warmup_of


def test_two_short_runs_report_rows_per_token_and_a_paired_delta(tmp_path):
    from benchmarks.quality import main

    out = tmp_path / "quality"
    argv = ["--shapes", "16e4", "--seeds", "0", "--steps", "10", "--warmup", "4", "--workers", "1",
            "--only", "topk", "anchored_M1", "--out", str(out), "--data", str(tmp_path / "data")]
    assert main(argv) == 0
    report = json.loads((out / "quality.json").read_text())
    rows = report["shapes"]["16e4"]["routings"]
    assert rows["anchored_M1"]["rows_per_token"] == 1.0  # one virtual rank per token
    assert 1.2 < rows["topk"]["rows_per_token"] <= 4.0
    for key, column in (("val_loss", "val_paired_vs_topk_pct_mean"), ("fresh_loss", "paired_vs_topk_pct_mean")):
        losses = {name: r["runs"][0][key] for name, r in rows.items()}
        expected = 100 * (losses["anchored_M1"] / losses["topk"] - 1)
        assert math.isclose(rows["anchored_M1"][column], expected, rel_tol=1e-9), key
    assert all(math.isfinite(r["runs"][0]["fresh_loss"]) for r in rows.values())
    assert (out / "quality.png").stat().st_size > 10_000
    assert "| anchored_M1 | 1 |" in (out / "quality.md").read_text()
    # --report-only reads the same runs back without training again.
    assert main(argv + ["--report-only"]) == 0
    assert json.loads((out / "quality.json").read_text())["shapes"] == report["shapes"]
    # The committed summaries alone (no cached run) give the same report, and say how to rerun.
    record = json.loads((tmp_path / "data" / "16e4_s10" / "anchored_M1_seed0.json").read_text())
    assert record["command"].startswith("megatron-c2r train --config configs/tiny_cpu.yaml --steps 10") and "c2r.max_groups=1" in record["command"]
    shutil.rmtree(out)
    assert main(argv + ["--report-only"]) == 0
    assert json.loads((out / "quality.json").read_text())["shapes"] == report["shapes"]


def test_paired_deltas_use_only_seeds_both_routings_ran():
    class Args:
        steps, warmup, seeds = 300, 60, [0, 1, 2]

    def run(seed, loss, rows):  # fresh = val + 0.1: the two pairings differ
        return {"seed": seed, "val_loss": loss, "fresh_loss": loss + 0.1, "rows_per_token": rows}

    results = {"16e4": {
        "topk": [run(0, 2.0, 2.5), run(1, 2.2, 2.7)],
        "anchored_M1": [run(0, 2.02, 1.0), run(1, 2.2 * 1.03, 1.0), run(2, 9.0, 1.0)],  # 2: no top-k
        "megatron_gl_1": [run(0, 2.02 * 1.05, 1.0), run(2, 9.0 * 0.98, 1.0)],
    }}
    shape = summarize(results, Args())["shapes"]["16e4"]
    head = shape["head_to_head"]["anchored_M1 vs megatron_gl_1"]["val"]
    assert head["seeds"] == 2 and head["lower"] == 1
    assert math.isclose(head["mean"], (100 * (1 / 1.05 - 1) + 100 * (1 / 0.98 - 1)) / 2)
    row = shape["routings"]["anchored_M1"]
    assert math.isclose(row["val_paired_vs_topk_pct_mean"], 2.0)
    assert math.isclose(row["val_paired_vs_topk_pct_sem"], 1.0)  # std sqrt(2) over sqrt(2) seeds
    fresh = [100 * (2.12 / 2.1 - 1), 100 * ((2.2 * 1.03 + 0.1) / 2.3 - 1)]
    assert math.isclose(row["paired_vs_topk_pct_mean"], sum(fresh) / 2)
    assert row["fewer_rows_than_alltoall"] == 4.0
    table = markdown_table(summarize(results, Args()))
    assert "| anchored_M1 | 3 |" in table and "| +2.00% ± 1.00 |" in table
    assert "| anchored_M1 vs megatron_gl_1 |" in table and "| 1 of 2 seeds |" in table


def test_router_statistics_keep_only_the_logged_windows_wholly_after_the_warm_up(tmp_path):
    from benchmarks.quality import post_warmup_stats

    # Logged every 40 iterations with a 60-step warm-up: the window ending at 80 holds 20 top-k
    # steps (41-60), so only the windows from 120 on count.
    path = tmp_path / "metrics.csv"
    rows = [(1, 5.3), (40, 5.3), (80, 3.65), (120, 2.0), (160, 2.0)]
    path.write_text("iteration,metric,value\n" + "".join(
        f"{it},moe/c2r/nodes_per_token,{v}\n{it},moe/c2r/other,9\n" for it, v in rows))
    assert post_warmup_stats(str(path), 40, 60)["nodes_per_token"] == [2.0, 2.0]
    assert post_warmup_stats(str(path), 20, 60)["nodes_per_token"] == [3.65, 2.0, 2.0]  # 61-80 ok


def test_a_routing_can_override_the_sweep_warmup():
    assert warmup_of(["c2r.mode=group", "c2r.warmup_steps=120"], 60) == 120
    assert warmup_of(["c2r.mode=group"], 60) == 60


def test_a_node_shape_run_reports_the_inter_node_hop_and_the_balance_column(tmp_path):
    from benchmarks.quality import main

    out = tmp_path / "quality"
    argv = ["--shapes", "64e8n4", "--seeds", "0", "--steps", "6", "--warmup", "2", "--workers", "1",
            "--only", "node_M1_bias", "--out", str(out), "--data", str(tmp_path / "data")]
    assert main(argv) == 0
    row = json.loads((out / "quality.json").read_text())["shapes"]["64e8n4"]["routings"]["node_M1_bias"]
    assert row["nodes_per_token"] == 1.0 and row["inter_node_rows_per_token"] == 0.75  # 1 node x 3/4
    assert row["fewer_inter_node_rows_than_alltoall"] == 8.0  # alltoall: 8 experts x 3/4 remote
    assert 1.0 <= row["rows_per_token"] <= 2.0  # at most the node's 2 ranks
    assert row["rank_load_max_over_mean"] >= row["node_load_max_over_mean"] >= 1.0
    assert "| node_M1_bias | 1 | " in (out / "quality.md").read_text()


def test_node_routings_measure_every_variant_on_the_same_node_blocks():
    for shape_name in ("64e8n4", "128e8n8"):
        shape = SHAPES[shape_name]
        assert shape["experts"] // shape["nodes"] >= 2 * shape["topk"]  # every node holds 2k experts
        variants = routings(shape)
        for name, sets in variants.items():
            assert f"c2r.num_nodes={shape['nodes']}" in sets and f"c2r.num_groups={shape['groups']}" in sets
        assert f"megatron.moe-router-num-groups={shape['nodes']}" in variants["megatron_nl_1"]
        assert ("megatron_nl_4" in variants) == (shape["nodes"] > 4)  # 4 of 4 nodes is top-k
        assert "c2r.group_bias_rate=0.001" in variants["node_M1_bias"]
        assert {"c2r.device_balance_coeff=0.05", "c2r.comm_balance_coeff=0.02"} <= set(variants["node_M2_balance"])


def test_node_columns_pair_inter_node_rows_and_balance_by_routing():
    class Args:
        steps, warmup, seeds = 600, 60, [0, 1]

    def run(seed, loss, nodes, rank_load, node_load):
        return {"seed": seed, "val_loss": loss, "fresh_loss": loss, "rows_per_token": 2 * nodes,
                "nodes_per_token": nodes, "inter_node_rows_per_token": nodes * 3 / 4,
                "rank_load_max_over_mean": rank_load, "node_load_max_over_mean": node_load}

    results = {"64e8n4": {
        "topk": [run(0, 2.0, 3.6, 1.2, 1.1), run(1, 2.1, 3.6, 1.2, 1.1)],
        "node_M1": [run(0, 2.02, 1.0, 1.6, 1.5), run(1, 2.1, 1.0, 1.8, 1.7)],
        "node_M1_bias": [run(0, 2.0, 1.0, 1.2, 1.1), run(1, 2.1 * 1.01, 1.0, 1.2, 1.1)],
        "megatron_nl_1": [run(0, 2.04, 1.0, 1.3, 1.2), run(1, 2.1 * 1.02, 1.0, 1.3, 1.2)],
    }}
    shape = summarize(results, Args())["shapes"]["64e8n4"]
    m1 = shape["routings"]["node_M1"]
    assert math.isclose(m1["fewer_inter_node_rows_than_topk"], 3.6)
    assert math.isclose(m1["fewer_inter_node_rows_than_alltoall"], 8.0)
    assert math.isclose(m1["rank_load_max_over_mean"], 1.7) and math.isclose(m1["node_load_max_over_mean"], 1.6)
    head = shape["head_to_head"]
    assert head["node_M1 vs megatron_nl_1"]["fresh"]["lower"] == 2
    assert head["node_M1_bias vs node_M1"]["fresh"]["seeds"] == 2
    table = markdown_table(summarize(results, Args()))
    assert "| node_M1 | 2 | 2.00 | 1.00 | 0.75 | 8.00× | 3.60× |" in table
    assert "| 1.70 | 1.60 |" in table


def test_ours_against_megatrons_frontier_interpolates_per_seed_at_our_nodes_per_token():
    from benchmarks.quality import megatron_frontier

    def run(seed, loss, nodes):
        return {"seed": seed, "fresh_loss": loss, "nodes_per_token": nodes}

    by_routing = {
        "megatron_nl_1": [run(0, 2.10, 1.0), run(1, 2.20, 1.0)],
        "megatron_nl_2": [run(0, 2.00, 2.0), run(1, 2.10, 2.0)],
        "node_B1.5": [run(0, 2.04, 1.5), run(1, 2.16, 1.5)],  # references 2.05 and 2.15
        "node_M1": [run(0, 2.0, 0.9)],  # below Megatron's measured range: left out
        "node_M2": [run(0, 2.0, 2.0000004)],  # the end of the range, measured a hair above it
    }
    row = megatron_frontier(by_routing)
    assert row.pop("node_M2")["mean"] == 0.0
    assert set(row) == {"node_B1.5"} and row["node_B1.5"]["seeds"] == 2 and row["node_B1.5"]["lower"] == 1
    assert math.isclose(row["node_B1.5"]["mean"], (100 * (2.04 / 2.05 - 1) + 100 * (2.16 / 2.15 - 1)) / 2)


def test_the_gap_trend_pairs_each_length_by_seed_on_the_seeds_every_length_has(tmp_path):
    from benchmarks.quality import main

    def commit(steps, routing, seed, loss):
        path = tmp_path / "data" / f"128e8n8_s{steps}" / f"{routing}_seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # the loss through the run: the last tenth at the final gap, the first at twice it
        tenths = [loss * 1.2] + [loss] * 9 if steps == 1200 else []
        path.write_text(json.dumps({"result": {"fresh_loss": loss, "loss_by_tenth": tenths}}))

    for seed in (0, 1):
        commit(600, "topk", seed, 2.0)
        commit(1200, "topk", seed, 1.8)
        commit(600, "node_M2", seed, 2.0 * 1.02)  # +2% at 600 steps
        commit(1200, "node_M2", seed, 1.8 * (1.01 if seed == 0 else 1.03))  # +1%, +3% at 1200
        commit(600, "megatron_nl_2", seed, 2.0 * 1.03)
        commit(1200, "megatron_nl_2", seed, 1.8 * 1.03)
    commit(600, "node_M2", 2, 9.0)  # a seed only one length has: left out
    commit(600, "topk", 2, 2.0)
    commit(600, "node_M1", 0, 2.1)  # a routing only one length has: left out
    from benchmarks.quality import gap_trend

    trend = gap_trend(str(tmp_path / "data"), "128e8n8", [600, 1200])
    assert set(trend) == {"megatron_nl_2 vs topk", "node_M2 vs topk", "node_M2 vs megatron_nl_2"}
    row = trend["node_M2 vs topk"]
    assert row["seeds"] == [0, 1]
    assert math.isclose(row["by_length"][600]["mean"], 2.0) and math.isclose(row["by_length"][1200]["mean"], 2.0)
    assert math.isclose(row["change"]["mean"], 0.0, abs_tol=1e-9) and row["change"]["smaller"] == 1
    assert trend["megatron_nl_2 vs topk"]["change"]["smaller"] == 0
    assert set(row["by_tenth"]) == {1200}  # the 600-step summaries recorded no tenths
    tenths = trend["megatron_nl_2 vs topk"]["by_tenth"][1200]
    assert [round(t["mean"], 6) for t in tenths] == [3.0] * 10 and tenths[0]["sem"] == 0.0
    out = tmp_path / "out"
    assert main(["--trend", "1200", "600", "--shapes", "128e8n8", "--data", str(tmp_path / "data"),
                 "--out", str(out), "--only", "node_M2"]) == 0
    table = (out / "quality_trend.md").read_text()
    assert "| node_M2 vs topk | 2 | +2.00% ± 0.00 | +2.00% ± 1.00 | +0.00% ± 1.00 | 1 of 2 seeds |" in table
    assert "megatron_nl_2 vs topk" not in table
    assert (out / "quality_trend_128e8n8.png").stat().st_size > 10_000
    # one length: the gaps at it, with the routings only that length has, and no change columns
    from benchmarks.quality import trend_table

    single = trend_table(str(tmp_path / "data"), ["128e8n8"], [600])
    assert "| node_M1 vs topk | 1 | +5.00% (1 seed) |\n" in single + "\n" and "change 600" not in single
