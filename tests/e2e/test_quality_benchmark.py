"""``benchmarks/quality.py`` end to end on two short real runs of the CPU main job, and its
paired-by-seed arithmetic."""

from __future__ import annotations

import json
import math

from benchmarks.quality import markdown_table, summarize, warmup_of


def test_two_short_runs_report_rows_per_token_and_a_paired_delta(tmp_path):
    from benchmarks.quality import main

    out = tmp_path / "quality"
    argv = ["--shapes", "16e4", "--seeds", "0", "--steps", "10", "--warmup", "4", "--workers", "1",
            "--only", "topk", "anchored_M1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "quality.json").read_text())
    rows = report["shapes"]["16e4"]["routings"]
    assert rows["anchored_M1"]["rows_per_token"] == 1.0  # one virtual rank per token
    assert 1.2 < rows["topk"]["rows_per_token"] <= 4.0
    delta = rows["anchored_M1"]["paired_vs_topk_pct_mean"]
    losses = {name: r["runs"][0]["val_loss"] for name, r in rows.items()}
    assert math.isclose(delta, 100 * (losses["anchored_M1"] / losses["topk"] - 1), rel_tol=1e-9)
    assert (out / "quality.png").stat().st_size > 10_000
    assert "| anchored_M1 | 1 |" in (out / "quality.md").read_text()
    # --report-only reads the same runs back without training again.
    assert main(argv + ["--report-only"]) == 0
    assert json.loads((out / "quality.json").read_text())["shapes"] == report["shapes"]


def test_paired_deltas_use_only_seeds_both_routings_ran():
    class Args:
        steps, warmup, seeds = 300, 60, [0, 1, 2]

    results = {"16e4": {
        "topk": [{"seed": 0, "val_loss": 2.0, "rows_per_token": 2.5},
                 {"seed": 1, "val_loss": 2.2, "rows_per_token": 2.7}],
        "anchored_M1": [{"seed": 0, "val_loss": 2.02, "rows_per_token": 1.0},
                        {"seed": 1, "val_loss": 2.2 * 1.03, "rows_per_token": 1.0},
                        {"seed": 2, "val_loss": 9.0, "rows_per_token": 1.0}],  # no top-k partner
        "megatron_gl_1": [{"seed": 0, "val_loss": 2.02 * 1.05, "rows_per_token": 1.0},
                          {"seed": 2, "val_loss": 9.0 * 0.98, "rows_per_token": 1.0}],
    }}
    shape = summarize(results, Args())["shapes"]["16e4"]
    head = shape["head_to_head"]["anchored_M1 vs megatron_gl_1"]
    assert head["seeds"] == 2 and head["lower"] == 1
    assert math.isclose(head["mean"], (100 * (1 / 1.05 - 1) + 100 * (1 / 0.98 - 1)) / 2)
    row = shape["routings"]["anchored_M1"]
    assert math.isclose(row["paired_vs_topk_pct_mean"], 2.0)
    assert math.isclose(row["paired_vs_topk_pct_sem"], 1.0)  # std sqrt(2) over sqrt(2) seeds
    assert row["fewer_rows_than_alltoall"] == 4.0
    table = markdown_table(summarize(results, Args()))
    assert "| anchored_M1 | 3 |" in table and "+2.00% ± 1.00" in table
    assert "| anchored_M1 vs megatron_gl_1 |" in table and "| 1 of 2 seeds |" in table


def test_a_routing_can_override_the_sweep_warmup():
    assert warmup_of(["c2r.mode=group", "c2r.warmup_steps=120"], 60) == 120
    assert warmup_of(["c2r.mode=group"], 60) == 60
