"""``benchmarks/designs_cost.py``: MoGE and BigMac rows in the cost model."""

from __future__ import annotations

import pytest

from benchmarks.designs_cost import designs, equal_active_ffn, markdown
from megatron_c2r.cost.inputs import LinkParams


def test_equal_active_ffn_keeps_the_active_expert_parameters():
    k, hidden, ffn, d = 8, 7168, 2048, 1792
    f = equal_active_ffn(k, hidden, ffn, d)
    assert abs(k * 3 * d * f + 2 * hidden * d - k * 3 * hidden * ffn) <= k * 3 * d  # rounding
    assert equal_active_ffn(4, 128, 128, 64) == 235  # docs/designs.md's tiny-job value


def test_moge_visits_every_node_and_bigmac_scales_bytes_not_rows():
    result = designs("deepseek_v3", 4, 128, [1792], LinkParams(), seed=0)
    by = {(r["routing"], r["method"]): r for r in result["rows"]}
    moge = by["MoGE over nodes (k/4 each)", "two_level"]
    assert moge["inter_node_rows_per_token"] == pytest.approx(3.0)  # every remote node, once
    ours = by["node-anchored M=1", "two_level"]
    assert ours["inter_node_rows_per_token"] == pytest.approx(0.75, rel=0.05)
    narrow = by["node-anchored M=1 + BigMac d=1792", "two_level"]
    assert narrow["inter_node_rows_per_token"] == ours["inter_node_rows_per_token"]
    assert narrow["comm_ms"] < ours["comm_ms"]
    assert any("MoGE over GPUs" in s for s in result["skipped"])  # 32 GPUs do not divide k=8
    table = markdown(result)
    assert "MoGE over nodes (k/4 each) + BigMac d=1792" in table and "Not applicable" in table
