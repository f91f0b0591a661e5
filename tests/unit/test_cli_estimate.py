"""``megatron-c2r estimate``: the modeled MoE-layer table for a config, synthetic and file routing
sources, and one-line errors (exit 2, before torch) for every bad flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from megatron_c2r.placement.sources import synthetic_top_indices
from tests.unit.test_cli_errors import ROOT, run_cli

SMALL = """\
megatron:
  num-experts: 16
  moe-router-topk: 2
  expert-model-parallel-size: 4
  hidden-size: 64
  moe-ffn-hidden-size: 32
  swiglu: true
  micro-batch-size: 1
  seq-length: 64
launch: {nodes: 2, gpus_per_node: 2}
"""
METHOD_LABELS = ("Megatron alltoall", "flex+DeepEP-style", "flex+HybridEP", "ours flat dedup",
                 "ours two-level")


def small_config(tmp_path) -> str:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return str(path)


def table_rows(stdout: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith(METHOD_LABELS)]


def test_estimate_prints_every_method_under_both_routings_and_writes_json(tmp_path):
    out = tmp_path / "est.json"
    code, err, _, _ = run_cli("estimate", "configs/deepseek_v3_like.yaml", "--tokens-per-gpu",
                              "64", "--nodes", "2", "--json", str(out))  # fmt: skip
    assert code == 0, err
    assert "--nodes 2: the EP group spans 2 node(s) of 8 GPUs (EP 16" in err
    data = json.loads(out.read_text())
    assert data["shape"]["ep_size"] == 16 and len(data["rows"]) == 10
    routings = {r["routing"] for r in data["rows"]}
    assert routings == {"Megatron group-limited 4 of 8", "node-anchored M=1"}
    by = {(r["routing"], r["method"]): r for r in data["rows"]}
    base = by["Megatron group-limited 4 of 8", "alltoall"]
    assert base["comm_vs_alltoall"] == 1.0 and base["inter_node_rows_per_token"] > 3
    ours = by["node-anchored M=1", "two_level"]
    assert ours["inter_node_rows_per_token"] <= 0.5 and ours["comm_vs_alltoall"] < 1
    assert os.listdir(tmp_path) == ["est.json"]  # no temp file left


def test_estimate_reads_a_routing_trace_and_a_coactivation_matrix(tmp_path):
    config = small_config(tmp_path)
    sets = synthetic_top_indices(16, 2, 2000, num_clusters=4, strength=3.0, seed=0)
    trace = tmp_path / "router_trace_rank0.jsonl"
    with open(trace, "w") as f:
        for layer in (0, 1):
            f.write(json.dumps({"layer": layer, "topk": 2, "top_indices": sets.tolist()}) + "\n")
    counts = np.zeros((16, 16), dtype=np.int64)
    for a, b in sets:
        counts[a, b] += 1
        counts[b, a] += 1
    matrix = tmp_path / "collab.npy"
    np.save(matrix, counts)
    for source, label in ((trace, "source routing (router_trace_rank0.jsonl)"),
                          (matrix, "source routing (collab.npy)")):  # fmt: skip
        code, err, _, _ = run_cli("estimate", config, "--routing", str(source))
        assert code == 0, err
    code, err, _, _ = run_cli("estimate", config, "--routing", str(trace), "--layer", "1")
    assert code == 0, err
    code, err, _, _ = run_cli("estimate", config, "--routing", str(trace), "--layer", "2")
    assert code == 2 and "--layer 2: " in err and "has layers 0..1" in err


def test_a_low_dim_dispatch_config_is_modeled_at_its_dispatch_width(tmp_path):
    out = tmp_path / "est.json"
    code, err, _, _ = run_cli("estimate", small_config(tmp_path), "--set", "c2r.dispatch_dim=16",
                              "--set", "c2r.mode=topk", "--json", str(out))  # fmt: skip
    assert code == 0, err
    assert "c2r.dispatch_dim=16: rows and experts modeled at d=16" in err
    assert json.loads(out.read_text())["shape"]["hidden"] == 16


def test_a_moge_config_is_modeled_with_its_group_balanced_routing(tmp_path):
    out = tmp_path / "est.json"
    code, err, _, _ = run_cli("estimate", small_config(tmp_path), "--set", "c2r.mode=group_balanced",
                              "--set", "c2r.num_groups=2", "--json", str(out))  # fmt: skip
    assert code == 0, err
    by = {(r["routing"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    # Groups of 8 experts = one node of 2 GPUs each: every token takes one expert per node, so
    # exactly one of its two nodes is remote; the groups' load is equal by construction.
    moge = by["MoGE k/2 from each of 2 groups", "two_level"]
    assert moge["inter_node_rows_per_token"] == 1.0
    assert moge["load_max_over_mean"] < 1.15


def test_estimate_table_has_the_rows_of_both_routings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_c2r", "estimate", small_config(tmp_path),
                          "--routing", "clustered:4:2"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = table_rows(out.stdout)
    assert len(rows) == 10 and sum("node-anchored M=1" in r for r in rows) == 5
    assert "routing: clustered 4x2" in out.stdout and "docs/cost_model.md" in out.stdout


def test_every_bad_estimate_input_is_one_line_exit_2_before_torch(tmp_path):
    config = small_config(tmp_path)
    dense = tmp_path / "dense.yaml"
    dense.write_text("megatron: {hidden-size: 64, micro-batch-size: 1, seq-length: 8}\n")
    afile = tmp_path / "a_file"
    afile.write_text("x")
    mixtral = "configs/mixtral_8x7b.yaml"
    cases = [
        (["--nodes", "0"], config, "--nodes=0 must be >= 1"),
        (["--nodes", "3"], mixtral, "megatron.--num-experts=8 must be divisible by EP (--nodes 3 "
                                    "x launch.gpus_per_node 8)=24"),
        (["--ib-gbps", "0"], config, "--ib-gbps=0.0 must be > 0"),
        (["--nvlink-latency-us", "-1"], config, "--nvlink-latency-us=-1.0 must be >= 0"),
        (["--routing", "nope.jsonl"], config, "--routing 'nope.jsonl': no such file or directory"),
        (["--routing", "clustered:x"], config, "--routing 'clustered:x': expected clustered[:C[:S]]"),
        (["--max-nodes", "3"], config, "--max-nodes=3 must be in [1, 2] (node-anchored M=3)"),
        (["--tokens-per-gpu", "0"], config, "--tokens-per-gpu=0 must be >= 1"),
        (["--layer", "0"], config, "--layer 0: only a routing file has layers"),
        (["--json", str(afile / "x.json")], config, "is a file, not a directory"),
        (["--set", "megatron.moe-router-topk=17"], config,
         "--set megatron.moe-router-topk=17: megatron.--moe-router-topk=17 must be <= "
         "--num-experts=16"),
        ([], str(dense), "megatron.--num-experts is not set: estimate models an MoE layer"),
        (["--set", "c2r.mode=c2r", "--set", "c2r.top_t=3"], config,
         "c2r.mode='c2r' routes from learned top-T lists"),
        (["--nodes", "two"], config, "argument --nodes: invalid int value: 'two'"),
    ]  # fmt: skip
    failures = []
    for extra, cfg, message in cases:
        code, err, heavy, _ = run_cli("estimate", cfg, *extra)
        lines = err.strip().splitlines()
        if not (code == 2 and len(lines) == 1 and message in lines[0] and not heavy):
            failures.append(f"{extra}: rc={code} heavy={heavy} stderr={err!r}")
    assert not failures, "\n".join(failures)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "dense.yaml", "small.yaml"]
