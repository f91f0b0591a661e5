"""Quality at equal bytes: loss vs rows shipped per token, side by side.

    python benchmarks/quality.py --quick          # ~5 min: 1 seed, 80 steps, 16e top-4
    python benchmarks/quality.py                  # the rank-level sweep (16e4, 64e8): 2 shapes x
                                                  # 12 routings x 3 seeds (72 runs, ~2 h on 2 cores)
    python benchmarks/quality.py --shapes 64e8n4 --steps 600   # node shapes (10 routings;
                                                  # ~4 min per 600-step run on one free core)
    python benchmarks/quality.py --explore --shapes 16e4 --only anchored_M1_warmup120 ...
    python benchmarks/quality.py --report-only --explore   # re-summarise runs already done

Every run is the CPU main job (``megatron-c2r train``: Megatron-core GPTModel, our router and
dispatcher) on the same data, schedule and seeds; only the routing differs. Routing quality does
not depend on how many processes hold the experts, so each run is one process (EP=1) and the EP
ranks are *virtual*: G groups of E/G experts (16e top-4: G=4, 64e top-8: G=8), exactly the
quantity a one-row-per-rank dispatcher ships at EP=G ("rows/token" = distinct groups per token,
read from the routers after warm-up). All variants get the same warm-up (plain top-k while the
trackers count co-activation) and then the same collaboration-aware placement (planned and
applied by relabelling), so every method is compared on planned groups. Exception: Megatron's
own group-/node-limited rows (``megatron_gl_*``, ``megatron_nl_*``) are TopKRouter's routing and
are constrained from step 0 (the placement still changes at the end of the warm-up);
``node_score_M1_warmup120`` is the same rule with our warm-up.

Two losses, both compared with top-k *paired by seed* (seeds change the initialisation and the
data order; a pair shares both), as mean ± standard error over seeds:
    fresh-batch loss  the mean training loss over the last third of the run. Training is a single
                      epoch, so each batch's loss is measured before the model has seen it: a
                      held-out estimate over 100k tokens (300 steps), five times the validation
                      sample, and the least noisy number here (the headline).
    val loss          the validation loss at the end (20 batches from the 5% held-out documents).
Runs of this size are chaotic: a no-op change (a 1e-9 penalty) moved one run's val loss by 3.5%,
and some seeds "break through" to a lower loss plateau earlier than others. Read differences
below about two standard errors as noise.

Routings (``c2r.*`` / Megatron flags):
    topk                  plain top-k (C2RRouter in 'topk' mode = Megatron's TopKRouter)
    megatron_gl_1/2       Megatron group-limited routing, groups = G, group_topk 1 / 2
    c2r_T<T>              the paper's rule with top-T lists from the tracker
    c2r_T<T>_penalty      + collaboration penalty
    anchored_M1/M2        group mode, top-1-anchored (the flagship)
    anchored_M1/M2_penalty  + collaboration penalty (mass outside the top-1 expert's group)
    group_score_M1/M2     group mode with Megatron's group-score selection on planned groups
    moge                  MoGE (issue 18, ``c2r.mode=group_balanced``): k/G experts from each of
                          the G virtual ranks, on the contiguous groups (``cpu.replan=false``)
    <routing>_bigmac      BigMac (issue 18): ``c2r.dispatch_dim`` = H/2, experts at d with the
                          FFN width F' that keeps the active parameters equal (``equal_active_ffn``)

Node shapes (``64e8n4``: 64 experts top-8 on 4 virtual nodes x 2 ranks; ``128e8n8``: 128 experts
top-8 on 8 nodes x 2 ranks; 16 experts = 2k per node) study the inter-node hop. Nodes are
contiguous blocks of virtual ranks; every routing records node statistics on them
(``c2r.num_nodes``). Routings:
    topk, c2r_T15         as above (64e8n4 also c2r_T7: top-1 and its 7 collaborators, the C2R
                          rule's row count nearest the node rules')
    megatron_nl_1/2       Megatron's node-limited routing: group-limited with groups = nodes
    node_M1/M2            c2r.mode=node, anchored: the top-1 expert's node (+ the best other)
    node_M<m>_bias        + c2r.group_bias_rate=1e-3 (aux-loss-free node bias, Megatron's rate)
    node_M<m>_balance     + DeepSeek-V2's device (0.05) and communication (0.02) balance losses
    moge, topk_bigmac, node_M1_bigmac   as above (MoGE over the G virtual ranks)
    node_M1_warmup120     node_M1 after 120 instead of 60 top-k warm-up steps
    node_score_M1_warmup120   Megatron's node-limited rule (group score) in our router, after the
                          same 120 warm-up steps (megatron_nl_* route constrained from step 0)
    node_score_M2         the same rule at M=2 after the usual 60 warm-up steps (node_M2 with
                          Megatron's node choice: splits the selection rule from the rest)
    node_score_M2_from0, megatron_nl_2_from0   both constrained from step 0 on contiguous
                          expert blocks (no warm-up, no placement): our router against Megatron's
                          with the same node choice (they differ in the aux loss's routing map)
    <routing>_auxpref     node_M2, node_B1.5_to2, node_B1.75_to2, node_score_M2_from0 with
                          c2r.aux_loss_map=preferred (the aux loss counts plain top-k's map, as
                          Megatron's own node-limited routing does, not the constrained map)
    node_B<b>[_to2][_ramp], node_B1.5[_to2]_<criterion>, node_soft<t>   issue 27's budgeted and
                          soft rules (docs/quality.md, "A row budget spent on the tokens ...")
    node_M1_hier, megatron_nl_1_hier    the placement planned nodes first, then ranks inside
                          each node (``cpu.replan_nodes=true``, as ``megatron-c2r plan --nodes``);
                          the other rows plan one flat partition into the G ranks
Extra columns: nodes/token; inter-node rows/token = nodes/token x (N-1)/N (the rows the
two-level dispatcher ships across nodes when a token starts on a uniformly random node), and how
many times fewer that is than Megatron's alltoall (k x (N-1)/N) and than top-k routing through
the same dispatcher; the busiest rank's and node's (token, expert) load over the mean, per step,
from the routers' statistics (``group_load_max_over_mean``, ``node_load_max_over_mean``).
Both tables also give the bytes shipped against Megatron's alltoall at full width H (rows
ratio x H/d for BigMac rows).

``--explore`` adds variants of the flagship aimed at the <= +0.5%-at->=4x goal: a longer warm-up
(``_warmup120``), re-planning every 60 steps from plain top-k's preference (``_replan60``), a
weaker penalty (``_penalty3e-4``), and aux-loss-free expert-bias balancing inside the constraint
(``_sigmoid_bias``, against ``topk_sigmoid_bias``).

Writes ``<out>/quality.json``, ``<out>/quality.md`` (tables, incl. ours vs Megatron group-limited
head to head) and ``<out>/quality.png`` (loss change vs rows/token); prints the tables. Runs are
cached in ``<out>/<shape>_s<steps>/<routing>_seed<seed>``; two execute in parallel (``--workers``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_c2r.files import write_text_atomic  # noqa: E402

# Committed per-run summaries (a few hundred bytes each): tables re-render without rerunning.
DATA = os.path.join(ROOT, "benchmarks", "data", "quality")

SHAPES = {
    # name: (experts, topk, virtual EP groups, expert ffn hidden, T values[, virtual nodes])
    "16e4": dict(experts=16, topk=4, groups=4, moe_ffn=128, top_t=(7, 3)),
    "64e8": dict(experts=64, topk=8, groups=8, moe_ffn=32, top_t=(31, 15)),
    # Node shapes: every node holds 2k experts (16), as a 256-expert top-8 model on 8-GPU nodes
    # holds 32+; same total expert parameters as the shapes above (E x moe_ffn = 2048).
    "64e8n4": dict(experts=64, topk=8, groups=8, nodes=4, moe_ffn=32, top_t=(15, 7)),
    "128e8n8": dict(experts=128, topk=8, groups=16, nodes=8, moe_ffn=16, top_t=(15,)),
}
# DeepSeek-V2's device- and communication-level balance coefficients (REFERENCE.md section 10),
# and Megatron's default expert-bias rate for the group (node) bias.
BALANCE_LOSSES = ["c2r.device_balance_coeff=0.05", "c2r.comm_balance_coeff=0.02"]
GROUP_BIAS = ["c2r.group_bias_rate=0.001"]
# Issue 27's study: mean nodes per token of the budgeted rule, its ramp (iterations after the
# warm-up), the soft bias's targets and step (in logits: the tiny model's router is softmax).
BUDGETS = (1.25, 1.5, 2.0)
BUDGETS_TO2 = (1.25, 1.5, 1.75)
BUDGET_RAMP = 240
SOFT_TARGETS = (1.5, 2.0)
SOFT_RATE = 0.02
# The tiny model's width (configs/tiny_cpu.yaml megatron.hidden-size) and BigMac's dispatch width.
HIDDEN = 128
DISPATCH_DIM = HIDDEN // 2


def equal_active_ffn(shape: Dict, d: int = DISPATCH_DIM, hidden: int = HIDDEN) -> int:
    """BigMac's expert FFN width F' at dispatch width d with the plain layer's active parameters
    (the paper's comparison): k SwiGLU experts 3*H*F = the shared projections 2*H*d + k * 3*d*F'."""
    k, f = shape["topk"], shape["moe_ffn"]
    return round((k * 3 * hidden * f - 2 * hidden * d) / (k * 3 * d))


def bigmac(shape: Dict) -> List[str]:
    """``c2r.dispatch_dim`` = H/2 at equal active parameters."""
    return [f"c2r.dispatch_dim={DISPATCH_DIM}", f"c2r.dispatch_ffn_hidden_size={equal_active_ffn(shape)}"]


def moge(shape: Dict) -> Dict[str, List[str]]:
    """MoGE (``c2r.mode=group_balanced``, k/G experts from each of the G virtual ranks) where G
    divides k. Its groups stay the contiguous expert blocks (``cpu.replan=false``), as in Pangu
    Pro MoE: the balance does not depend on the grouping, and a collaboration-aware plan would
    put the experts a token wants together in the one group it may take only k/G from."""
    if shape["topk"] % shape["groups"]:
        return {}
    return {"moge": ["c2r.mode=group_balanced", "cpu.replan=false"]}


def routings(shape: Dict) -> Dict[str, List[str]]:
    if "nodes" in shape:
        return node_routings(shape)
    g = shape["groups"]
    out = {
        "topk": ["c2r.mode=topk"],
        "megatron_gl_1": ["c2r.mode=topk", f"megatron.moe-router-num-groups={g}", "megatron.moe-router-group-topk=1"],
        "megatron_gl_2": ["c2r.mode=topk", f"megatron.moe-router-num-groups={g}", "megatron.moe-router-group-topk=2"],
    }
    for t in shape["top_t"]:
        out[f"c2r_T{t}"] = ["c2r.mode=c2r", f"c2r.top_t={t}"]
    t = shape["top_t"][-1]
    out[f"c2r_T{t}_penalty"] = ["c2r.mode=c2r", f"c2r.top_t={t}", "c2r.penalty_coeff=0.003"]
    for m in (1, 2):
        out[f"anchored_M{m}"] = ["c2r.mode=group", f"c2r.max_groups={m}", "c2r.group_selection=anchored"]
        out[f"group_score_M{m}"] = ["c2r.mode=group", f"c2r.max_groups={m}", "c2r.group_selection=group_score"]
        out[f"anchored_M{m}_penalty"] = out[f"anchored_M{m}"] + ["c2r.penalty_coeff=0.003"]
    # Issue 18's designs: the balance end (MoGE) and narrow rows (BigMac, plain and composed).
    out.update(moge(shape))
    out["topk_bigmac"] = out["topk"] + bigmac(shape)
    out["anchored_M1_bigmac"] = out["anchored_M1"] + bigmac(shape)
    return {name: sets + [f"c2r.num_groups={g}"] for name, sets in out.items()}


AUXPREF = ("node_M2", "node_B1.5_to2", "node_B1.75_to2", "node_score_M2_from0")


def node_routings(shape: Dict) -> Dict[str, List[str]]:
    """Routings of a node shape: G virtual ranks on D virtual nodes (contiguous blocks of G/D
    ranks); every routing also records node statistics (``c2r.num_nodes``)."""
    g, d = shape["groups"], shape["nodes"]
    out = {"topk": ["c2r.mode=topk"]}
    for m in (1, 2, 4):  # key rows first (a study cut short keeps them): M=1, then M=2
        # Megatron's node-limited routing: group-limited with groups = nodes (4 of D < 4: none).
        if m < d:
            out[f"megatron_nl_{m}"] = ["c2r.mode=topk", f"megatron.moe-router-num-groups={d}",
                                       f"megatron.moe-router-group-topk={m}"]
        if m == 4:
            continue
        node = ["c2r.mode=node", f"c2r.max_nodes={m}", "c2r.group_selection=anchored"]
        out[f"node_M{m}"] = node
        out[f"node_M{m}_bias"] = node + GROUP_BIAS
        out[f"node_M{m}_balance"] = node + BALANCE_LOSSES
    for t in shape["top_t"]:
        out[f"c2r_T{t}"] = ["c2r.mode=c2r", f"c2r.top_t={t}"]
    out.update(moge(shape))  # MoGE over the G virtual ranks: every token visits every node
    out["topk_bigmac"] = out["topk"] + bigmac(shape)
    out["node_M1_bigmac"] = out["node_M1"] + bigmac(shape)
    # A longer top-k warm-up before the node rule switches on (it helped M=1 at the rank level).
    out["node_M1_warmup120"] = out["node_M1"] + ["c2r.warmup_steps=120"]
    # Megatron's node-limited rule inside our router (group_score: equal to group_limited_topk
    # with groups = nodes, tested), so it gets the same top-k warm-up as ours: Megatron's own
    # rows (megatron_nl_*) route constrained from step 0.
    out["node_score_M1_warmup120"] = ["c2r.mode=node", "c2r.max_nodes=1", "c2r.group_selection=group_score",
                                      "c2r.warmup_steps=120"]
    # The same at M=2 with the 60-step warm-up: node_M2 with Megatron's node choice.
    out["node_score_M2"] = ["c2r.mode=node", "c2r.max_nodes=2", "c2r.group_selection=group_score"]
    # Constrained from step 0 on the contiguous expert blocks (no warm-up, so no placement):
    # the same selection in our router and in Megatron's, apart from the aux loss's map.
    out["node_score_M2_from0"] = out["node_score_M2"] + ["c2r.warmup_steps=0"]
    out["megatron_nl_2_from0"] = out["megatron_nl_2"] + ["c2r.warmup_steps=0"]
    # Issue 27: a row budget spent on the tokens that lose most (node M=1 relaxed to all nodes,
    # mean nodes per token <= B), with a ramp, other criteria, relax_to=2; the soft locality bias.
    for b in BUDGETS:
        out[f"node_B{b}"] = out["node_M1"] + [f"c2r.mean_budget={b}"]
        out[f"node_B{b}_ramp"] = out[f"node_B{b}"] + [f"c2r.budget_ramp_steps={BUDGET_RAMP}"]
    for b in BUDGETS_TO2:  # relaxed to 2 nodes: more tokens relaxed, each by one node
        out[f"node_B{b}_to2"] = out["node_M1"] + [f"c2r.mean_budget={b}", "c2r.relax_to=2"]
        out[f"node_B{b}_to2_ramp"] = out[f"node_B{b}_to2"] + [f"c2r.budget_ramp_steps={BUDGET_RAMP}"]
    for criterion in ("best_outside", "entropy"):
        out[f"node_B1.5_{criterion}"] = out["node_B1.5"] + [f"c2r.relax_by={criterion}"]
        out[f"node_B1.5_to2_{criterion}"] = out["node_B1.5_to2"] + [f"c2r.relax_by={criterion}"]
    for t in SOFT_TARGETS:
        out[f"node_soft{t}"] = out["node_M1"] + [f"c2r.locality_bias_target={t}",
                                                 f"c2r.locality_bias_rate={SOFT_RATE}"]
    # Megatron's aux-loss map (plain top-k's preference, not the constrained map) under our rules.
    for name in AUXPREF:
        out[f"{name}_auxpref"] = out[name] + ["c2r.aux_loss_map=preferred"]
    # The in-run plan nodes first (cpu.replan_nodes: as `plan --nodes`), for ours and Megatron's.
    for name in ("node_M1", "megatron_nl_1"):
        out[f"{name}_hier"] = out[name] + ["cpu.replan_nodes=true"]
    return {name: sets + [f"c2r.num_groups={g}", f"c2r.num_nodes={d}"] for name, sets in out.items()}


def explorations(shape: Dict) -> Dict[str, List[str]]:
    """``--explore``: variants of the flagship aimed at the <= +0.5%-at->=4x goal."""
    if "nodes" in shape:
        return {}
    g = shape["groups"]
    bias = ["megatron.moe-router-score-function=sigmoid", "megatron.moe-router-enable-expert-bias=true",
            "megatron.moe-router-load-balancing-type=none"]
    out = {"topk_sigmoid_bias": ["c2r.mode=topk"] + bias}
    for m in (1, 2):
        anchored = ["c2r.mode=group", f"c2r.max_groups={m}", "c2r.group_selection=anchored"]
        out[f"anchored_M{m}_warmup120"] = anchored + ["c2r.warmup_steps=120"]
        out[f"anchored_M{m}_penalty3e-4"] = anchored + ["c2r.penalty_coeff=0.0003"]
        out[f"anchored_M{m}_sigmoid_bias"] = anchored + bias
        out[f"anchored_M{m}_replan60"] = anchored + ["c2r.refresh_interval=60"]
    return {name: sets + [f"c2r.num_groups={g}"] for name, sets in out.items()}


EXPLORATION_NAMES = {name for shape in SHAPES.values() for name in explorations(shape)}


def warmup_of(sets: List[str], default: int) -> int:
    """A routing's own ``c2r.warmup_steps=N`` overrides the sweep's warm-up."""
    found = [int(s.split("=", 1)[1]) for s in sets if s.startswith("c2r.warmup_steps=")]
    return found[-1] if found else default


def summary_path(data_dir: str, out_dir: str) -> str:
    """The committed summary of the run cached in ``out_dir`` (``<shape>_s<steps>/<routing>_seed<n>``):
    ``<data_dir>/<shape>_s<steps>/<routing>_seed<n>.json``."""
    shape_steps, run = os.path.split(os.path.normpath(out_dir))
    return os.path.join(data_dir, os.path.basename(shape_steps), run + ".json")


def post_warmup_stats(metrics_csv: str, log_interval: int, warmup: int) -> Dict[str, List[float]]:
    """Router statistics (mean over MoE layers) of the logged windows that lie wholly after the
    warm-up (a logged value averages the iterations since the last log): distinct virtual ranks
    (nodes) per token, busiest rank's (node's) load over the mean."""
    stats: Dict[str, List[float]] = {name: [] for name in ROUTER_STATS}
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = row["metric"].removeprefix("moe/c2r/")
            if name in stats and int(row["iteration"]) - log_interval >= warmup:
                stats[name].append(float(row["value"]))
    return stats


def run_one(out_dir: str, shape: Dict, sets: List[str], seed: int, steps: int, warmup: int,
            data_dir: Optional[str] = None) -> Dict:
    """One run's results (losses, router statistics), from the committed summary under
    ``data_dir`` if there is one, else from the run cached in ``out_dir`` (trained first if it
    is not there); a new result is written to ``data_dir`` (small JSON, committed)."""
    committed = summary_path(data_dir, out_dir) if data_dir else None
    if committed and os.path.exists(committed) and not os.path.exists(os.path.join(out_dir, "summary.json")):
        with open(committed, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("sets") != sets:
            raise RuntimeError(f"{committed} was run with {record.get('sets')}, the routing now sets "
                               f"{sets}: delete the file to rerun it")
        return record["result"]
    warmup = warmup_of(sets, warmup)
    common = [
        "megatron.expert-model-parallel-size=1",
        f"megatron.num-experts={shape['experts']}",
        f"megatron.moe-router-topk={shape['topk']}",
        f"megatron.moe-ffn-hidden-size={shape['moe_ffn']}",
        f"megatron.seed={seed}",
        f"megatron.lr-warmup-iters={max(1, steps // 15)}",
        f"megatron.log-interval={max(1, steps // 30)}",
        f"c2r.warmup_steps={warmup}",
        "c2r.dispatcher=dedup",
        # The study's rows count the aux losses on the constrained map (the default before
        # 'auto'); the _auxpref rows set the preferred map after this.
        "c2r.aux_loss_map=constrained",
        # The corpus of every run in docs/quality.md (this Python's first 4 MB of stdlib files),
        # not the main job's reference corpus, so cached and published runs stay comparable.
        "cpu.corpus=stdlib",
        "cpu.corpus_bytes=4000000",
    ]
    cmd = [sys.executable, "-m", "megatron_c2r", "train", "--config",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--out", out_dir, "--steps", str(steps),
           "--no-progress"]
    for item in common + sets:
        cmd += ["--set", item]
    if not os.path.exists(os.path.join(out_dir, "summary.json")):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    stats = post_warmup_stats(os.path.join(out_dir, "metrics.csv"), max(1, steps // 30), warmup)
    with open(os.path.join(out_dir, "history.csv"), newline="", encoding="utf-8") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    window = max(1, steps // 3)  # the last third of the run
    out = {"val_loss": summary["val_loss"], "fresh_loss": statistics.mean(losses[-window:]),
           # the loss through the run, for the gap's trend: mean training loss of each tenth
           "loss_by_tenth": [statistics.mean(losses[i * len(losses) // 10:(i + 1) * len(losses) // 10])
                             for i in range(10)] if len(losses) >= 10 else []}
    for name, key in ROUTER_STATS.items():
        out[key] = statistics.mean(stats[name]) if stats[name] else math.nan
    if "nodes" in shape:  # a token's own node is one of D: (D-1)/D of its node rows cross
        out["inter_node_rows_per_token"] = out["nodes_per_token"] * (shape["nodes"] - 1) / shape["nodes"]
    if committed:
        record = {"command": " ".join(["megatron-c2r", "train", "--config", "configs/tiny_cpu.yaml", "--steps", str(steps)]
                                      + [f"--set {item}" for item in common + sets]),
                  "sets": sets, "seed": seed, "steps": steps, "result": out}
        os.makedirs(os.path.dirname(committed), exist_ok=True)
        write_text_atomic(committed, json.dumps(record, indent=1, sort_keys=True) + "\n", prefix=".quality-")
    return out


# metrics.csv name (moe/c2r/...) -> run key
ROUTER_STATS = {
    "groups_per_token": "rows_per_token",
    "nodes_per_token": "nodes_per_token",
    "group_load_max_over_mean": "rank_load_max_over_mean",
    "node_load_max_over_mean": "node_load_max_over_mean",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 16e4 only, 80 steps")
    ap.add_argument("--shapes", nargs="+", default=["16e4", "64e8"], choices=list(SHAPES),
                    help="default: the rank-level shapes; node shapes: 64e8n4 128e8n8")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=60, help="plain top-k steps before planning")
    ap.add_argument("--only", nargs="+", help="routing names to run (default all)")
    ap.add_argument("--explore", action="store_true",
                    help="add the exploration variants (warm-up, penalty, expert bias, re-planning)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report-only", action="store_true",
                    help="summarise the runs already in --out (no new runs)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality"))
    ap.add_argument("--data", default=DATA,
                    help="committed per-run summaries (read instead of rerunning; new runs add theirs)")
    ap.add_argument("--trend", nargs="+", type=int, metavar="STEPS",
                    help="no training: the gaps vs top-k at these run lengths (e.g. 600 1200), "
                         "paired by seed, from the committed summaries under --data")
    args = ap.parse_args(argv)
    if args.trend:
        table = trend_table(args.data, args.shapes, args.trend, args.only)
        os.makedirs(args.out, exist_ok=True)
        write_text_atomic(os.path.join(args.out, "quality_trend.md"), table + "\n", prefix=".quality-")
        print(table)
        for shape_name in args.shapes:
            if plot_trend(args.data, shape_name, args.trend, args.only,
                          os.path.join(args.out, f"quality_trend_{shape_name}.png")):
                print(f"wrote {os.path.join(args.out, f'quality_trend_{shape_name}.png')}")
        return 0
    if args.quick:
        args.shapes, args.seeds, args.steps, args.warmup = ["16e4"], [0], 80, 20
    from tqdm import tqdm

    jobs = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        variants = {**routings(shape), **(explorations(shape) if args.explore else {})}
        for name, sets in variants.items():
            if args.only and name not in args.only:
                continue
            for seed in args.seeds:
                run_dir = os.path.join(args.out, f"{shape_name}_s{args.steps}", f"{name}_seed{seed}")
                if args.report_only and not (
                        os.path.exists(os.path.join(run_dir, "summary.json"))
                        or os.path.exists(summary_path(args.data, run_dir))):
                    continue
                jobs.append((shape_name, name, seed, run_dir, shape, sets))
    # Seed-major: a study cut short still has every routing of its first seeds (complete pairs).
    jobs.sort(key=lambda j: (args.seeds.index(j[2]), args.shapes.index(j[0])))
    results: Dict = {}
    with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), desc="quality runs") as bar:
        futures = {pool.submit(run_one, j[3], j[4], j[5], j[2], args.steps, args.warmup, args.data): j
                   for j in jobs}
        for fut, job in futures.items():
            results.setdefault(job[0], {}).setdefault(job[1], []).append(
                {**fut.result(), "seed": job[2], "row_width": row_width(job[5])})
            bar.update(1)
    if not jobs:
        print(f"quality.py: no runs to do or report under --out={args.out} for --shapes "
              f"{' '.join(args.shapes)}: drop --report-only or check --out/--steps", file=sys.stderr)
        return 2
    report = summarize(results, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(os.path.join(args.out, "quality.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)
    plot(report, os.path.join(args.out, "quality.png"))
    return 0


def paired(runs: List[Dict], reference: List[Dict], key: str = "fresh_loss") -> Dict:
    """% change of ``key`` of ``runs`` against ``reference`` on the same seeds (same init and
    batches)."""
    by_seed = {r["seed"]: r[key] for r in reference}
    deltas = [100 * (r[key] / by_seed[r["seed"]] - 1) for r in runs if r["seed"] in by_seed]
    spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return {"mean": statistics.mean(deltas) if deltas else None, "std": spread,
            "sem": spread / math.sqrt(len(deltas)) if len(deltas) > 1 else None,
            "seeds": len(deltas), "lower": sum(d < 0 for d in deltas)}


# Head-to-head at equal rows/token: ours against Megatron's group-limited (node-limited)
# routing, and the balanced node variants against the unbalanced ones; same seeds.
HEAD_TO_HEAD = (
    [(f"anchored_M{m}{tail}", f"megatron_gl_{m}") for m in (1, 2) for tail in ("", "_warmup120")]
    + [(f"node_M{m}{tail}", f"megatron_nl_{m}") for m in (1, 2) for tail in ("", "_bias", "_balance")]
    + [(f"node_M{m}{tail}", f"node_M{m}") for m in (1, 2) for tail in ("_bias", "_balance")]
    + [("anchored_M1_bigmac", "anchored_M1"), ("node_M1_bigmac", "node_M1")]
    + [("node_M1_warmup120", "megatron_nl_1"), ("node_M1_warmup120", "node_M1"),
       ("node_M1_warmup120", "node_score_M1_warmup120"), ("node_score_M1_warmup120", "megatron_nl_1")]
    + [("node_score_M2", "megatron_nl_2"), ("node_M2", "node_score_M2"),
       ("node_score_M2_from0", "megatron_nl_2_from0"), ("node_score_M2", "node_score_M2_from0"),
       ("megatron_nl_2", "megatron_nl_2_from0")]
    + [("node_M1_hier", "megatron_nl_1_hier"), ("node_M1_hier", "node_M1"),
       ("megatron_nl_1_hier", "megatron_nl_1")]
    # Issue 27: the budget spent adaptively vs the hard rules at the same rows.
    + [("node_B2.0", "megatron_nl_2"), ("node_B2.0", "node_M2"), ("node_B2.0_ramp", "node_B2.0"),
       ("node_B1.5_ramp", "node_B1.5"), ("node_B1.25_ramp", "node_B1.25"), ("node_soft2.0", "megatron_nl_2")]
    # The soft bias against the hard rule and the budget at its target.
    + [("node_soft2.0", "node_M2"), ("node_soft1.5", "node_B1.5_to2")]
    + [(f"node_B1.5_{v}", "node_B1.5") for v in ("to2", "best_outside", "entropy")]
    + [(f"node_B1.5_to2_{v}", "node_B1.5_to2") for v in ("best_outside", "entropy")]
    + [(f"node_B{b}_to2_ramp", f"node_B{b}_to2") for b in BUDGETS_TO2]
    + [("node_B1.75_to2", "megatron_nl_2"), ("node_B1.75_to2", "node_M2")]
    + [(f"{name}_auxpref", name) for name in AUXPREF]
    + [(f"{name}_auxpref", "megatron_nl_2") for name in AUXPREF[:3]]
    + [("node_score_M2_from0_auxpref", "megatron_nl_2_from0")]
)


def width_of(runs: List[Dict]) -> float:
    """A routing's row width d/H (runs recorded before BigMac rows existed: full width)."""
    return runs[0].get("row_width", 1.0)


def row_width(sets: List[str]) -> float:
    """Dispatched row width over the model width H: d/H with ``c2r.dispatch_dim=d``, else 1."""
    found = [int(s.split("=", 1)[1]) for s in sets if s.startswith("c2r.dispatch_dim=")]
    return found[-1] / HIDDEN if found else 1.0


def _mean_of(runs: List[Dict], key: str) -> float:
    """Mean of ``key`` over runs that have it (runs cached before a statistic existed: nan)."""
    values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
    return statistics.mean(values) if values else math.nan


def node_columns(shape: Dict, runs: List[Dict], topk_runs: List[Dict]) -> Dict:
    """Inter-node hop and balance of a node shape's routing: distinct nodes per token, the rows
    the two-level dispatcher ships across nodes per token (nodes x (D-1)/D), how many times
    fewer than Megatron's alltoall (k x (D-1)/D: one row per remote expert) and than top-k
    routing through the same dispatcher, and the busiest rank's / node's load over the mean."""
    d, k = shape["nodes"], shape["topk"]
    inter = _mean_of(runs, "inter_node_rows_per_token")
    topk_inter = _mean_of(topk_runs, "inter_node_rows_per_token")
    return {
        "nodes": d,
        "nodes_per_token": _mean_of(runs, "nodes_per_token"),
        "inter_node_rows_per_token": inter,
        "inter_node_rows_alltoall": k * (d - 1) / d,
        "fewer_inter_node_rows_than_alltoall": k * (d - 1) / d / inter if inter else None,
        "fewer_inter_node_rows_than_topk": topk_inter / inter if inter else None,
        "fewer_inter_node_bytes_than_alltoall": (k * (d - 1) / d / inter / width_of(runs)
                                                 if inter else None),
        "rank_load_max_over_mean": _mean_of(runs, "rank_load_max_over_mean"),
        "node_load_max_over_mean": _mean_of(runs, "node_load_max_over_mean"),
    }


def summarize(results: Dict, args) -> Dict:
    report = {"steps": args.steps, "warmup": args.warmup, "seeds": args.seeds, "shapes": {}}
    for shape_name, by_routing in results.items():
        k = SHAPES[shape_name]["topk"]
        rows = {}
        for name, runs in by_routing.items():
            losses = [r["val_loss"] for r in runs]
            rpt = statistics.mean(r["rows_per_token"] for r in runs)
            vs_topk = paired(runs, by_routing.get("topk", []))
            val_vs_topk = paired(runs, by_routing.get("topk", []), key="val_loss")
            rows[name] = {
                "paired_vs_topk_pct_mean": vs_topk["mean"],
                "paired_vs_topk_pct_std": vs_topk["std"],
                "paired_vs_topk_pct_sem": vs_topk["sem"],
                "paired_seeds": vs_topk["seeds"],
                "val_paired_vs_topk_pct_mean": val_vs_topk["mean"],
                "val_paired_vs_topk_pct_sem": val_vs_topk["sem"],
                "fresh_loss_mean": statistics.mean(r["fresh_loss"] for r in runs),
                "val_loss_mean": statistics.mean(losses),
                "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "rows_per_token": rpt,
                "fewer_rows_than_alltoall": k / rpt if rpt else None,
                # Bytes: every row is d/H as wide with BigMac (alltoall at full width H).
                "row_width": width_of(runs),
                "fewer_bytes_than_alltoall": k / rpt / width_of(runs) if rpt else None,
                **(node_columns(SHAPES[shape_name], runs, by_routing.get("topk", []))
                   if "nodes" in SHAPES[shape_name] else {}),
                "runs": runs,
            }
        head_to_head = {}
        for ours, theirs in HEAD_TO_HEAD:
            if ours in by_routing and theirs in by_routing:
                fresh = paired(by_routing[ours], by_routing[theirs])
                if fresh["seeds"]:
                    head_to_head[f"{ours} vs {theirs}"] = {
                        "fresh": fresh, "val": paired(by_routing[ours], by_routing[theirs], key="val_loss")}
        report["shapes"][shape_name] = {"topk": k, "groups": SHAPES[shape_name]["groups"],
                                        "nodes": SHAPES[shape_name].get("nodes"), "routings": rows,
                                        "head_to_head": head_to_head,
                                        "vs_megatron_frontier": megatron_frontier(by_routing)}
    return report


def megatron_frontier(by_routing: Dict) -> Dict:
    """Ours against Megatron's node-limited frontier at equal inter-node rows, per seed: each of
    our routings' fresh-batch loss against Megatron's interpolated linearly (in nodes per token)
    between the two ``megatron_nl_<m>`` runs of that seed that bracket our run's nodes per
    token. {routing: paired % change (mean, sem, seeds, lower)}; routings outside Megatron's
    measured range, or without a bracketing pair on a seed, are left out."""
    megatron = sorted(n for n in by_routing if n.startswith("megatron_nl_") and n[len("megatron_nl_"):].isdigit())
    out = {}
    for name, runs in by_routing.items():
        if not name.startswith("node_"):
            continue
        deltas = []
        for run in runs:
            points = sorted((r["nodes_per_token"], r["fresh_loss"]) for m in megatron
                            for r in by_routing[m] if r["seed"] == run["seed"])  # fmt: skip
            x = run.get("nodes_per_token", math.nan)
            if points and abs(x - points[-1][0]) < 1e-3:  # the same limit measured a hair apart
                x = points[-1][0]
            elif points and abs(x - points[0][0]) < 1e-3:
                x = points[0][0]
            for (x0, y0), (x1, y1) in zip(points, points[1:]):
                if x0 <= x <= x1 and x1 > x0:
                    reference = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                    deltas.append(100 * (run["fresh_loss"] / reference - 1))
                    break
        if deltas:
            sem = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else None
            out[name] = {"mean": statistics.mean(deltas), "sem": sem, "seeds": len(deltas),
                         "lower": sum(d < 0 for d in deltas)}
    return out


def committed_runs(data_dir: str, shape_name: str, steps: int) -> Dict[str, Dict[int, Dict]]:
    """{routing: {seed: result}} of the committed summaries of ``<shape>_s<steps>``."""
    runs: Dict[str, Dict[int, Dict]] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, f"{shape_name}_s{steps}", "*_seed*.json"))):
        routing, seed = os.path.basename(path)[: -len(".json")].rsplit("_seed", 1)
        with open(path, encoding="utf-8") as f:
            runs.setdefault(routing, {})[int(seed)] = json.load(f)["result"]
    return runs


def gap_trend(data_dir: str, shape_name: str, lengths: List[int]) -> Dict:
    """Does a routing's gap to top-k shrink or grow with a longer run? For every routing
    committed at each length (each with its own cosine schedule), the fresh-batch loss vs
    top-k paired by seed at each length, on the seeds that every length has (routing and top-k),
    and the per-seed change from the shortest to the longest length. The same for every
    HEAD_TO_HEAD pair committed at each length."""
    runs = {n: committed_runs(data_dir, shape_name, n) for n in lengths}

    def pairs() -> List[tuple]:
        names = set.intersection(*(set(r) for r in runs.values())) if runs else set()
        return ([(name, "topk") for name in sorted(names) if name != "topk" and "topk" in names]
                + [(a, b) for a, b in HEAD_TO_HEAD if a in names and b in names and b != "topk"])

    out = {}
    for ours, theirs in pairs():
        seeds = sorted(set.intersection(*(set(runs[n][ours]) & set(runs[n][theirs]) for n in lengths)))
        if not seeds:
            continue
        deltas = {n: [100 * (runs[n][ours][s]["fresh_loss"] / runs[n][theirs][s]["fresh_loss"] - 1)
                      for s in seeds] for n in lengths}  # fmt: skip
        first, last = lengths[0], lengths[-1]
        change = [b - a for a, b in zip(deltas[first], deltas[last])]
        through = {}  # the gap through each run, by tenth (runs that recorded it)
        for n in lengths:
            tenths = [(runs[n][ours][s].get("loss_by_tenth"), runs[n][theirs][s].get("loss_by_tenth")) for s in seeds]
            if all(a and b for a, b in tenths):
                per_tenth = [[100 * (a[i] / b[i] - 1) for a, b in tenths] for i in range(10)]
                through[n] = [{"mean": statistics.mean(d), "sem": _sem(d)} for d in per_tenth]
        out[f"{ours} vs {theirs}"] = {
            "seeds": seeds,
            "by_length": {n: {"mean": statistics.mean(d), "sem": _sem(d), "per_seed": d} for n, d in deltas.items()},
            "by_tenth": through,
            "change": {"mean": statistics.mean(change), "sem": _sem(change),
                       "smaller": sum(abs(b) < abs(a) for a, b in zip(deltas[first], deltas[last]))},
        }
    return out


def _sem(values: List[float]) -> Optional[float]:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def trend_table(data_dir: str, shapes: List[str], lengths: List[int], only: Optional[List[str]] = None) -> str:
    """Markdown of ``gap_trend`` per shape (``only``: keep pairs whose first routing is listed)."""
    lengths = sorted(lengths)
    lines = []
    for shape_name in shapes:
        trend = {k: v for k, v in gap_trend(data_dir, shape_name, lengths).items()
                 if not only or k.split(" vs ")[0] in only}
        if not trend:
            continue
        lines.append(f"\n**{shape_name}**: fresh-batch loss change, paired by seed, by run length "
                     f"(each length its own cosine schedule; committed summaries under {os.path.relpath(data_dir, ROOT)})\n")
        head = " | ".join(f"{n} steps" for n in lengths)
        one = len(lengths) == 1  # one length: no change to report
        tail = "" if one else f" change {lengths[0]} → {lengths[-1]} | smaller gap in |"
        lines.append(f"| pair | seeds | {head} |{tail}")
        lines.append("|---|---|" + "---|" * len(lengths) + ("" if one else "---|---|"))
        for name, t in trend.items():
            cells = " | ".join(_change(t["by_length"][n]["mean"], t["by_length"][n]["sem"]) for n in lengths)
            c = t["change"]
            lines.append(f"| {name} | {len(t['seeds'])} | {cells} |" + ("" if one else
                         f" {_change(c['mean'], c['sem'])} | {c['smaller']} of {len(t['seeds'])} seeds |"))
    return "\n".join(lines) if lines else f"no routing is committed at every length {lengths} under {data_dir}"


def plot_trend(data_dir: str, shape_name: str, lengths: List[int], only: Optional[List[str]], path: str) -> bool:
    """The gap to top-k through each run (mean training loss per tenth of the run, paired by
    seed, mean ± s.e.m.), one line per routing and run length; False when nothing to plot."""
    trend = {k: v for k, v in gap_trend(data_dir, shape_name, sorted(lengths)).items()
             if k.endswith(" vs topk") and v["by_tenth"] and (not only or k.split(" vs ")[0] in only)}
    if not trend:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {n: style for n, style in zip(sorted(lengths), ("--", "-", ":", "-."))}
    for i, (name, t) in enumerate(trend.items()):
        for n, tenths in sorted(t["by_tenth"].items()):
            x = [(j + 0.5) * n / 10 for j in range(10)]
            ax.errorbar(x, [d["mean"] for d in tenths], yerr=[d["sem"] or 0.0 for d in tenths], ls=styles[n],
                        marker="o", ms=3, capsize=2, color=plt.cm.tab10(i % 10),
                        label=f"{name.split(' vs ')[0]}, {n}-step run ({len(t['seeds'])} seeds)")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("training step (each run its own cosine schedule; a point = a tenth of the run)")
    ax.set_ylabel("training loss vs top-k, paired by seed (%, ± s.e.m.)")
    ax.set_title(f"{shape_name}: the gap to top-k through the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _change(mean: float, sem: Optional[float]) -> str:
    """'+1.23% ± 0.45', or '+1.23% (1 seed)' when there is no spread to estimate."""
    return f"{mean:+.2f}% ± {sem:.2f}" if sem is not None else f"{mean:+.2f}% (1 seed)"


def _times(ratio: Optional[float]) -> str:
    return "—" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}×"


def markdown_table(report: Dict) -> str:
    lines = []
    for shape_name, shape in report["shapes"].items():
        counts = {len(r["runs"]) for r in shape["routings"].values()}
        seeds = f"{max(counts)} seed(s)" if len(counts) == 1 else f"{min(counts)}-{max(counts)} seeds"
        nodes = shape.get("nodes")
        where = f", {nodes} virtual nodes" if nodes else ""
        lines.append(f"\n**{shape_name}** ({seeds}, {report['steps']} steps, "
                     f"warm-up {report['warmup']}, virtual EP = {shape['groups']}{where})\n")
        if nodes:
            lines.append("| routing | seeds | ranks/token | nodes/token | inter-node rows/token | fewer than "
                         "alltoall | fewer than top-k | fewer inter-node bytes than alltoall | "
                         "fresh-batch loss vs top-k | val loss vs top-k | "
                         "busiest rank / mean | busiest node / mean | val loss (mean ± std) |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            lines.append("| routing | seeds | rows/token | fewer rows than alltoall | fewer bytes than "
                         "alltoall | fresh-batch loss vs top-k | val loss vs top-k | val loss (mean ± std) |")
            lines.append("|---|---|---|---|---|---|---|---|")
        for name, r in sorted(shape["routings"].items(), key=lambda kv: kv[1]["rows_per_token"], reverse=True):
            fresh, val = "—", "—"
            if name != "topk" and r["paired_vs_topk_pct_mean"] is not None:
                fresh = _change(r["paired_vs_topk_pct_mean"], r["paired_vs_topk_pct_sem"])
                val = _change(r["val_paired_vs_topk_pct_mean"], r["val_paired_vs_topk_pct_sem"])
            tail = f"{fresh} | {val} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} |"
            if nodes:
                lines.append(
                    f"| {name} | {len(r['runs'])} | {r['rows_per_token']:.2f} | {r['nodes_per_token']:.2f} | "
                    f"{r['inter_node_rows_per_token']:.2f} | {_times(r['fewer_inter_node_rows_than_alltoall'])} | "
                    f"{_times(r['fewer_inter_node_rows_than_topk'])} | "
                    f"{_times(r.get('fewer_inter_node_bytes_than_alltoall'))} | {fresh} | {val} | "
                    f"{r['rank_load_max_over_mean']:.2f} | {r['node_load_max_over_mean']:.2f} | "
                    f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} |")  # fmt: skip
            else:
                lines.append(f"| {name} | {len(r['runs'])} | {r['rows_per_token']:.2f} | "
                             f"{r['fewer_rows_than_alltoall']:.2f}× | "
                             f"{_times(r.get('fewer_bytes_than_alltoall'))} | {tail}")
        if shape.get("vs_megatron_frontier"):
            lines.append("\n| ours vs Megatron's node-limited frontier at equal inter-node rows (per seed, "
                         "interpolated in nodes/token) | fresh-batch loss change | lower in |")
            lines.append("|---|---|---|")
            for name, f in shape["vs_megatron_frontier"].items():
                lines.append(f"| {name} | {_change(f['mean'], f['sem'])} | {f['lower']} of {f['seeds']} seeds |")
        if shape.get("head_to_head"):
            lines.append("\n| at equal rows/token | fresh-batch loss change | lower in | val loss change | lower in |")
            lines.append("|---|---|---|---|---|")
            for name, h in shape["head_to_head"].items():
                f, v = h["fresh"], h["val"]
                lines.append(f"| {name} | {_change(f['mean'], f['sem'])} | {f['lower']} of {f['seeds']} seeds | "
                             f"{_change(v['mean'], v['sem'])} | {v['lower']} of {v['seeds']} seeds |")
    return "\n".join(lines)


def plot(report: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = report["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False)
    for ax, (shape_name, shape) in zip(axes[0], shapes.items()):
        k, nodes = shape["topk"], shape.get("nodes")
        # x: rows per token on the hop that matters (node shapes: the inter-node hop), and what
        # Megatron's alltoall ships there (one row per expert; per remote expert across nodes).
        key, full = ("inter_node_rows_per_token", k * (nodes - 1) / nodes) if nodes else ("rows_per_token", k)
        # The goal: within +0.5% of top-k at >= 4x fewer rows than alltoall.
        ax.fill_between([0.0, full / 4], -10, 0.5, color="tab:green", alpha=0.08, label="goal (≤ +0.5%, ≥ 4×)")
        ax.axhline(0.0, color="grey", lw=0.8)
        shown = [(n, r) for n, r in shape["routings"].items()
                 if n != "topk" and r["paired_vs_topk_pct_mean"] is not None]
        columns: Dict[float, List[str]] = {}  # spread points that share a rows/token value
        for name, r in shown:
            columns.setdefault(round(r[key] * 10) / 10, []).append(name)
        for i, (name, r) in enumerate(shown):
            column = columns[round(r[key] * 10) / 10]
            x = r[key] + 0.035 * full / 4 * (column.index(name) - (len(column) - 1) / 2)
            ours = name.startswith(("anchored", "node_"))
            marker = "*" if ours else ("s" if name.startswith("megatron") else "o")
            ax.errorbar(x, r["paired_vs_topk_pct_mean"], yerr=r["paired_vs_topk_pct_sem"],
                        fmt=marker, ms=10 if marker == "*" else 6, capsize=3, label=name,
                        color=plt.cm.tab20(i % 20),
                        mfc="none" if name in EXPLORATION_NAMES else None)
        topk_rows = shape["routings"].get("topk", {}).get(key)
        if topk_rows:
            ax.plot([topk_rows], [0.0], "kD", label="topk (planned placement, one row per destination)")
        ax.set_xlim(0.0 if nodes else 0.6, full + 0.1)
        values = [r["paired_vs_topk_pct_mean"] for r in shape["routings"].values()
                  if r["paired_vs_topk_pct_mean"] is not None]
        ax.set_ylim(min(values + [0.0]) - 1.5, max(values + [0.0]) + 3.0)  # room for the legend
        hop = "inter-node rows per token" if nodes else "rows shipped per token"
        ax.set_xlabel(f"{hop} (alltoall ships {full:g})")
        ax.set_ylabel("fresh-batch loss vs top-k, paired by seed (%, ± s.e.m.)")
        where = f", {nodes} nodes" if nodes else ""
        ax.set_title(f"{shape_name}: loss vs bytes (virtual EP={shape['groups']}{where})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
