"""Inputs that would cost without bound are refused in one line, fast, before any allocation."""

from __future__ import annotations

import json
import time

import pytest

from megatron_c2r.placement.sources import MAX_EXPERTS, load_collaboration
from tests.unit.test_cli_errors import run_cli


def test_a_trace_naming_an_expert_id_far_beyond_any_model_is_refused_before_allocating(tmp_path):
    trace = tmp_path / "router_trace_rank0.jsonl"
    trace.write_text(json.dumps({"layer": 0, "topk": 2, "top_indices": [[0, 10**9], [1, 2]]}) + "\n")
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_collaboration(str(trace))  # E**2 counts at E = 1e9 would be 8e18 bytes
    assert time.perf_counter() - start < 2.0
    assert f"expert id {10**9}" in str(info.value) and "--num-experts" in str(info.value)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"layer": 0, "topk": 2, "top_indices": [[0, MAX_EXPERTS - 1]]}) + "\n")
    assert load_collaboration(str(ok))[0].num_experts == MAX_EXPERTS


def test_an_extreme_tokens_per_gpu_is_one_line_before_any_sampling():
    start = time.perf_counter()
    code, err, heavy, _ = run_cli("estimate", "configs/deepseek_v3_like.yaml",
                                  "--tokens-per-gpu", "200000")
    assert code == 2 and time.perf_counter() - start < 30
    assert "--tokens-per-gpu=200000" in err and "32768 or less" in err
    assert len(err.strip().splitlines()) == 1


def test_seq_length_and_max_position_embeddings_are_two_settings_not_one_that_silently_wins():
    from megatron_c2r.cpu.job_config import load_train_job
    from tests.e2e.test_cpu_main_job import ROOT as REPO

    tiny = f"{REPO}/configs/tiny_cpu.yaml"
    cfg, _ = load_train_job(tiny, ["megatron.seq-length=64", "megatron.max-position-embeddings=256"])
    assert (cfg.seq_length, cfg.max_position_embeddings) == (64, 256)
    with pytest.raises(ValueError, match=r"max-position-embeddings=32 is below megatron.--seq-length=64"):
        load_train_job(tiny, ["megatron.seq-length=64", "megatron.max-position-embeddings=32"])


def test_a_trace_naming_more_layers_than_any_model_is_refused_before_the_count_matrices(tmp_path):
    from megatron_c2r.placement.sources import MAX_LAYERS

    trace = tmp_path / "router_trace_rank0.jsonl"
    with open(trace, "w") as f:
        for layer in range(MAX_LAYERS + 1):
            f.write(json.dumps({"layer": layer, "topk": 2, "top_indices": [[0, 1]]}) + "\n")
    with pytest.raises(ValueError, match=f"names {MAX_LAYERS + 1} MoE layers"):
        load_collaboration(str(trace))
