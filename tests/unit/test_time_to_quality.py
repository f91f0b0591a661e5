"""Time to quality (``cost.time_to_quality``, ``estimate --baseline-loss/--candidate-loss``): the
estimator recovers known answers, reads the CPU job's history.csv and Megatron-style TensorBoard
events, and refuses every bad loss file in one line (exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import os
import pathlib

import numpy as np
import pytest

from megatron_c2r.cost.time_to_quality import (
    LossCurve,
    late_slope_rho,
    read_loss_curve,
    step_flops,
    token_efficiency,
)
from megatron_c2r.cpu.outputs import _write_history
from tests.unit.test_cli_errors import ROOT, run_cli

REAL_RUN = os.path.join(ROOT, "benchmarks", "data", "time_to_quality", "64e8n4", "topk_seed0.json")
QWEN = "configs/qwen3_30b_a3b_like.yaml"


def synthetic(m: float, seed: int, noise: float, side: str, steps: int = 600) -> LossCurve:
    """Needs m times the baseline's steps: L(s / m), L = 1.6 + 4 s^-0.45, a seed offset shared
    by the pair (same init and data) and independent per-step noise."""
    rng = np.random.default_rng(seed * 1000 + (side == "candidate"))
    offset = np.random.default_rng(seed).normal(0, 0.03)
    s = np.arange(1, steps + 1, dtype=float)
    loss = 1.6 + offset + 4.0 * np.power(s / m, -0.45) + rng.normal(0, noise, steps)
    return LossCurve(path=f"{side}{seed}", kind="synthetic", steps_N=s, loss_N=loss)


@pytest.mark.parametrize("noise", [0.02, 0.05])
@pytest.mark.parametrize("m", [1.0, 1.15, 1.3, 1.45, 1.6])
def test_a_candidate_needing_m_times_the_steps_gets_rho_one_over_m_within_3_percent(m, noise):
    base = [synthetic(1.0, seed, noise, "baseline") for seed in range(3)]
    cand = [synthetic(m, seed, noise, "candidate") for seed in range(3)]
    te = token_efficiency(base, cand)
    assert te.rho == pytest.approx(1 / m, rel=0.03)
    assert te.rho_ci[0] <= te.rho <= te.rho_ci[1] and len(te.rho_pairs) == 3
    assert not te.fit.poor and te.fit.beta == pytest.approx(0.45, rel=0.2)
    # The late-training figure charges the same loss gap far more steps.
    assert te.rho_late_slope == pytest.approx(late_slope_rho(te.relative_gap))
    if m > 1.1:
        assert te.rho_late_slope < te.rho


@pytest.mark.parametrize("m", [1.2, 1.5])
def test_log_linear_curves_like_the_tiny_runs_recover_rho_from_the_local_slope(m):
    """The tiny CPU runs fall as a straight line in log steps over [S/10, S] (beta -> 0): no
    asymptote, but rho still comes from the local slope."""
    s = np.arange(1, 601, dtype=float)

    def run(factor, seed, side):
        rng = np.random.default_rng(seed * 1000 + (side == "c"))
        loss = 5.0 - 0.34 * np.log(s / factor) + rng.normal(0, 0.05, len(s))
        return LossCurve(path=f"{side}{seed}", kind="synthetic", steps_N=s, loss_N=loss)

    te = token_efficiency([run(1.0, k, "b") for k in range(3)], [run(m, k, "c") for k in range(3)])
    assert te.rho == pytest.approx(1 / m, rel=0.03)
    assert not te.fit.poor and "log-linear" in te.fit.note


def real_losses() -> np.ndarray:
    with open(REAL_RUN, encoding="utf-8") as f:
        return np.array(json.load(f)["loss"])


def write_history_csv(path, losses) -> str:
    """A history.csv written by the CPU job's own writer (its columns and integer iterations)."""
    rows = [{"iteration": i + 1, "loss": float(v), "lr": 1e-3, "grad_norm": 1.0, "constrained": 0}
            for i, v in enumerate(losses)]  # fmt: skip
    _write_history(rows, str(path))
    return str(path)


def write_tensorboard(directory, losses, every: int = 1) -> str:
    """Events the way Megatron-LM and the CPU job write them: SummaryWriter.add_scalar('lm loss')."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for i, v in enumerate(losses):
        if (i + 1) % every == 0:
            writer.add_scalar("lm loss", float(v), i + 1)
            writer.add_scalar("learning-rate", 1e-3, i + 1)
    writer.close()
    return str(directory)


def stretched(losses: np.ndarray, m: float) -> np.ndarray:
    """The real curve as a run needing m times the steps: loss at step s is the real loss at s/m."""
    s = np.arange(1, len(losses) + 1, dtype=float)
    return np.interp(s / m, s, losses)


def test_reads_a_real_history_csv_and_tensorboard_events_and_recovers_rho(tmp_path):
    losses = real_losses()  # 600 steps of quality.py's 64e8n4 top-k, seed 0
    csv_path = write_history_csv(tmp_path / "history.csv", losses)
    tb = write_tensorboard(tmp_path / "tb", stretched(losses, 1.3))
    a, b = read_loss_curve(csv_path), read_loss_curve(tb)
    assert a.kind == "csv" and b.kind == "tensorboard"
    assert a.steps_N.tolist() == list(range(1, 601)) and np.allclose(a.loss_N, losses)
    assert b.steps_N.tolist() == list(range(1, 601))
    assert np.allclose(b.loss_N, stretched(losses, 1.3), atol=1e-5)  # float32 in the events
    same = token_efficiency([a], [read_loss_curve(csv_path)])
    assert same.rho == pytest.approx(1.0, abs=1e-6) and same.relative_gap == 0
    slower = token_efficiency([a], [b])
    assert slower.rho == pytest.approx(1 / 1.3, rel=0.06)
    assert not slower.fit.poor


def test_step_flops_counts_moe_layers_and_attention_from_the_config():
    from megatron_c2r.run_config import load_config

    ds = step_flops(load_config(os.path.join(ROOT, "configs", "deepseek_v3_like.yaml")))
    assert (ds.moe_layers, ds.dense_layers) == (58, 3)  # --moe-layer-freq ([0]*3+[1]*58)
    qwen = step_flops(load_config(os.path.join(ROOT, QWEN)))
    assert (qwen.moe_layers, qwen.dense_layers) == (48, 0)
    # Qwen3-30B-A3B-like: GQA 32 heads / 4 groups x 128, H 2048, seq 4096, fwd+bwd = 3 x fwd.
    proj = 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048
    attn = 2 * proj + 2 * 2048 * 32 * 2 * 128
    assert qwen.per_moe_layer == pytest.approx(3 * (attn + 2 * 2048 * 128))


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def synthetic_csvs(tmp_path, m: float, seeds: int = 2) -> tuple:
    paths = {"baseline": [], "candidate": []}
    for side, factor in (("baseline", 1.0), ("candidate", m)):
        for seed in range(seeds):
            curve = synthetic(factor, seed, 0.02, side)
            path = tmp_path / f"{side}{seed}.csv"
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["iteration", "loss"])
                w.writerows(zip(curve.steps_N.astype(int).tolist(), curve.loss_N.tolist()))
            paths[side].append(str(path))
    return paths["baseline"], paths["candidate"]


def test_estimate_reports_rho_tau_and_their_ratio_in_the_json(tmp_path):
    base, cand = synthetic_csvs(tmp_path, 1.25)
    out = tmp_path / "ttq.json"
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--tokens-per-gpu", "64",
                              "--baseline-loss", *base, "--candidate-loss", *cand, "--json", str(out))  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["token_efficiency"] == pytest.approx(0.8, rel=0.03)
    assert data["time_to_quality_speedup"] == pytest.approx(data["token_efficiency"] / data["step_time_ratio"])
    tau = data["inputs"]["step_time_ratio"]
    assert tau["source"] == "cost model" and tau["moe_layers"] == 48
    assert data["step_time_ratio"] == pytest.approx(tau["tau_no_overlap"])
    assert data["inputs"]["baseline_loss"] == base and data["inputs"]["candidate_loss"] == cand
    # A measured step: tau = (1 - share) + share x the modeled comm ratio.
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--tokens-per-gpu", "64",
                              "--baseline-loss", *base, "--candidate-loss", *cand, "--a2a-share",
                              "0.4", "--step-time-ms", "1000", "--json", str(out))  # fmt: skip
    assert code == 0, err
    measured = json.loads(out.read_text())
    tau = measured["inputs"]["step_time_ratio"]
    assert tau["source"] == "measured"
    assert measured["step_time_ratio"] == pytest.approx(0.6 + 0.4 * tau["modeled_comm_ratio"])
    assert tau["candidate_step_time_ms"] == pytest.approx(1000 * measured["step_time_ratio"])


def bad_files(tmp_path) -> dict:
    """name -> (file, words its error must contain)."""
    good = synthetic(1.0, 0, 0.02, "x")
    cases = {}
    p = tmp_path / "no_loss.csv"
    p.write_text("iteration,lm_loss\n1,2.0\n")
    cases["missing column"] = (str(p), ["no_loss.csv", "'loss'", "column"])
    p = tmp_path / "text.csv"
    p.write_text("iteration,loss\n1,2.0\n2,abc\n")
    cases["non-numeric"] = (str(p), ["text.csv", "line 3", "'abc'", "not a number"])
    p = tmp_path / "nan.csv"
    p.write_text("iteration,loss\n1,2.0\n2,nan\n")
    cases["non-finite"] = (str(p), ["nan.csv", "not finite"])
    p = tmp_path / "few.csv"
    # Logged every 70 steps: 3 points in the final window (enough), 8 in the fit range (too few).
    p.write_text("iteration,loss\n" + "".join(f"{s},{3 - s / 1000}\n" for s in range(70, 600, 70)))
    cases["too few points"] = (str(p), ["few.csv", "8 logged points", "fit range", "--log-interval"])
    p = tmp_path / "empty_tb"
    p.mkdir()
    cases["no events"] = (str(p), ["empty_tb", "TensorBoard event files"])
    cases["missing file"] = (str(tmp_path / "nope.csv"), ["nope.csv", "does not exist"])
    p = tmp_path / "good.csv"
    with open(p, "w") as f:
        f.write("iteration,loss\n" + "".join(f"{int(s)},{v}\n" for s, v in zip(good.steps_N, good.loss_N)))
    return cases, str(p)


def test_every_bad_loss_file_is_one_line_naming_it_exit_2_nothing_written(tmp_path):
    cases, good = bad_files(tmp_path)
    out = tmp_path / "out" / "ttq.json"
    out.parent.mkdir()
    for name, (path, words) in cases.items():
        side = "--candidate-loss" if name == "too few points" else "--baseline-loss"
        argv = ["estimate", QWEN, "--nodes", "2", "--tokens-per-gpu", "64", "--json", str(out)]
        argv += [side, path, "--candidate-loss" if side == "--baseline-loss" else "--baseline-loss", good]
        if name == "too few points":  # the baseline is fitted: too few points there
            argv = ["estimate", QWEN, "--nodes", "2", "--json", str(out), "--baseline-loss", path,
                    "--candidate-loss", path]  # fmt: skip
        code, err, heavy, _ = run_cli(*argv)
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megatron-c2r estimate: error:"), (name, err)
        assert all(w in lines[0] for w in words), (name, lines[0])
        assert "torch" not in heavy, name  # refused before any modelling
        assert os.listdir(out.parent) == [], name


def test_a_short_candidate_and_unpaired_flags_are_refused(tmp_path):
    base, _ = synthetic_csvs(tmp_path, 1.0, seeds=1)
    short = tmp_path / "short.csv"
    curve = synthetic(1.0, 0, 0.02, "c", steps=450)
    short.write_text("iteration,loss\n" + "".join(f"{int(s)},{v}\n" for s, v in zip(curve.steps_N, curve.loss_N)))
    out = tmp_path / "x.json"
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--baseline-loss", *base,
                              "--candidate-loss", str(short), "--json", str(out))  # fmt: skip
    assert code == 2 and "short.csv" in err and "ends at step 450" in err and "600 steps" in err, err
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--baseline-loss", *base)
    assert code == 2 and "--baseline-loss needs --candidate-loss" in err, err
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--baseline-loss", *base,
                              "--candidate-loss", *base, "--a2a-share", "1.5")  # fmt: skip
    assert code == 2 and "--a2a-share=1.5" in err, err
    other = tmp_path / "tb_tag"
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(other))
    w.add_scalar("lm loss validation", 2.0, 1)  # events, but not the training loss
    w.close()
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--baseline-loss", str(other),
                              "--candidate-loss", *base)  # fmt: skip
    assert code == 2 and "tb_tag" in err and "'lm loss'" in err, err
    assert not out.exists()


def test_the_cli_transport_choices_are_the_cost_models_methods():
    from megatron_c2r.cost.inputs import TRANSPORTS
    from megatron_c2r.cost.model import METHODS

    assert TRANSPORTS == METHODS


def test_recommend_ranks_every_configuration_against_megatrons_best(tmp_path):
    out = tmp_path / "rec.json"
    code, err, _, _ = run_cli("estimate", QWEN, "--nodes", "2", "--tokens-per-gpu", "64",
                              "--recommend", "--json", str(out))  # fmt: skip
    assert code == 0, err
    rec = json.loads(out.read_text())["recommendation"]
    ranked = rec["ranked_late"]
    assert rec["study_shape"] == "64e8n4"  # nearest to 2 nodes
    assert {(r["routing"], r["transport"]) for r in ranked} >= {("topk", "alltoall"), ("topk", "deepep"),
                                                                 ("node_M1_warmup120", "two_level")}
    times = [r["time_to_quality_s"] for r in ranked]
    assert times == sorted(times)
    best_megatron = min(r["time_to_quality_s"] for r in ranked if r["megatron"])
    for r in ranked:
        assert r["speedup_vs_megatron_best"] == pytest.approx(best_megatron / r["time_to_quality_s"])
        assert r["rho"] == 1.0 if r["routing"] in ("topk", "topk_hier") else r["rho"] < 1.0


def test_the_benchmark_on_the_committed_curves_has_the_zero_loss_row_and_the_physical_limit(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ttq_bench", os.path.join(ROOT, "benchmarks", "time_to_quality.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0  # 2 and 8 nodes, 512 tokens
    result = json.loads((tmp_path / "time_to_quality.json").read_text())
    table = result["tables"]["True_False"]  # late slope, no overlap
    assert set(table) == {f"{m}_{n}" for m in bench.MODELS for n in (2, 8)}
    for cell in table.values():
        assert cell["deepep_topk"]["speedup"] == pytest.approx(1.0)
        # Zero-loss placement: rho = 1; under uniform scores it routes exactly as top-k.
        assert cell["hier_deepep"]["rho"] == 1.0 and cell["hier_deepep"]["speedup"] == pytest.approx(1.0)
        assert cell["hier_two_level"]["rho"] == 1.0
        assert all(r["routing_stats"] == "uniform" for r in cell.values())
        # Nothing at rho = 1 beats the same step with no all-to-all at all.
        at_one = [r["speedup"] for r in cell.values() if r["rho"] == 1.0 and r is not cell["limit"]]
        assert cell["limit"]["speedup"] >= max(at_one) - 1e-9
    # --cases re-ranks the same modeled step times without modeling again: the same tables;
    # cases modeled for another workload are refused.
    again = tmp_path / "again"
    cases = str(tmp_path / "time_to_quality.json")
    assert bench.main(["--quick", "--cases", cases, "--out", str(again)]) == 0
    assert json.loads((again / "time_to_quality.json").read_text())["tables"] == result["tables"]
    with pytest.raises(SystemExit, match="modeled with 512 tokens per GPU"):
        bench.main(["--no-doc", "--tokens-per-gpu", "1024", "--cases", cases, "--out", str(again)])
    # Our best budget is chosen among gaps with 3 seeds only: a 1-seed gap, however good, is not.
    from megatron_c2r.cost.inputs import LinkParams

    case = next(c for c in bench.load_cases(cases, 512, LinkParams()) if c["nodes"] == 8)
    study = bench.build_study()
    study["shapes"]["128e8n8"]["gaps"]["node_B1.25_to2"] = dict(mean=-5.0, sem=None, seeds=1, source="test")
    assert bench.table_rows(case, study, True, False)["ours_budget_deepep"]["routing"] != "node_B1.25_to2"
    study["shapes"]["128e8n8"]["gaps"]["node_B1.25_to2"]["seeds"] = 3
    assert bench.table_rows(case, study, True, False)["ours_budget_deepep"]["routing"] == "node_B1.25_to2"
    # An aux-loss-map variant ships its rule's rows: the same step times, modeled or rebuilt from
    # cases modeled before the variant existed; with a 3-seed gap it competes for our best.
    variants = [key for key in case["_times"] if key[0].endswith("_auxpref")]
    assert {r for r, _ in variants} == {"node_M2_auxpref", "node_B1.25_to2_auxpref", "node_B1.5_to2_auxpref",
                                        "node_B1.75_to2_auxpref"}
    for routing, transport in variants:
        assert case["_times"][routing, transport] == case["_times"][routing.removesuffix("_auxpref"), transport]
    older = json.loads(pathlib.Path(cases).read_text())
    for c in older["cases"]:
        c["times"] = {k: v for k, v in c["times"].items() if "_auxpref" not in k}
    (tmp_path / "older.json").write_text(json.dumps(older))
    rebuilt = next(c for c in bench.load_cases(str(tmp_path / "older.json"), 512, LinkParams()) if c["nodes"] == 8)
    assert rebuilt["_times"] == case["_times"]
    study["shapes"]["128e8n8"]["gaps"]["node_B1.5_to2_auxpref"] = dict(mean=-6.0, sem=0.1, seeds=3, source="test")
    assert bench.table_rows(case, study, True, False)["ours_budget_deepep"]["routing"] == "node_B1.5_to2_auxpref"
    # Our M=2 row takes the better aux-loss map, among 3-seed gaps only.
    study["shapes"]["128e8n8"]["gaps"]["node_M2_auxpref"] = dict(mean=-6.0, sem=None, seeds=1, source="test")
    assert bench.table_rows(case, study, True, False)["ours_M2_deepep"]["routing"] == "node_M2"
    study["shapes"]["128e8n8"]["gaps"]["node_M2_auxpref"]["seeds"] = 3
    assert bench.table_rows(case, study, True, False)["ours_M2_deepep"]["routing"] == "node_M2_auxpref"
    # With --gap-steps 1200, our best budget comes from the 1,200-step runs where the shape has
    # them: a better 600-step gap of a rule not rerun does not stand in for one.
    gaps = study["shapes"]["128e8n8"]["gaps"]
    study["gap_steps"] = 1200
    gaps["node_B1.5_to2_auxpref"]["steps"] = 1200
    gaps["node_B1.25_to2"].update(mean=-9.0, seeds=3, steps=600)
    assert bench.table_rows(case, study, True, False)["ours_budget_deepep"]["routing"] == "node_B1.5_to2_auxpref"
    gaps["node_B1.25_to2"]["steps"] = 1200
    assert bench.table_rows(case, study, True, False)["ours_budget_deepep"]["routing"] == "node_B1.25_to2"


def test_gaps_from_longer_runs_replace_only_the_routings_committed_at_that_length(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ttq_bench", os.path.join(ROOT, "benchmarks", "time_to_quality.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def commit(steps, routing, seed, loss):
        path = tmp_path / f"128e8n8_s{steps}" / f"{routing}_seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"result": {"fresh_loss": loss}}))

    for seed, (g600, g1200) in enumerate([(0.02, 0.01), (0.04, 0.01), (0.03, 0.01)]):
        commit(600, "topk", seed, 2.0)
        commit(600, "node_M2", seed, 2.0 * (1 + g600))
        commit(600, "node_M1", seed, 2.0 * 1.05)
        commit(1200, "topk", seed, 1.8)
        commit(1200, "node_M2", seed, 1.8 * (1 + g1200))
    short = bench.build_study(quality_data=str(tmp_path))["shapes"]["128e8n8"]["gaps"]
    long = bench.build_study(gap_steps=1200, quality_data=str(tmp_path))["shapes"]["128e8n8"]["gaps"]
    assert short["node_M2"]["mean"] == pytest.approx(3.0) and long["node_M2"]["mean"] == pytest.approx(1.0)
    assert long["node_M2"]["source"].endswith("1200-step runs") and long["node_M2"]["seeds"] == 3
    assert long["node_M1"] == short["node_M1"] and long["node_M1"]["mean"] == pytest.approx(5.0)
    # documented gaps of routings with no committed runs stay as they were, and so do those
    # documented over more seeds than the committed runs have so far
    assert long["megatron_nl_1"]["source"] == bench.DOCS_SOURCE
    commit(600, "megatron_nl_1", 0, 2.0 * 1.10)
    again = bench.build_study(quality_data=str(tmp_path))["shapes"]["128e8n8"]["gaps"]
    assert again["megatron_nl_1"] == short["megatron_nl_1"]
