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


def test_a_routing_can_override_the_sweep_warmup():
    assert warmup_of(["c2r.mode=group", "c2r.warmup_steps=120"], 60) == 120
    assert warmup_of(["c2r.mode=group"], 60) == 60
