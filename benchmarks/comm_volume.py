"""Rows shipped per token by the EP communicator, measured from its own counters on real gloo
all-to-alls, side by side for Megatron's alltoall, our dedup dispatcher, planned placement and
constrained routing.

    python benchmarks/comm_volume.py                     # EP=4 and 8, five shapes, 2 trained
    python benchmarks/comm_volume.py --trained-shapes all --docs docs   # the README table
    python benchmarks/comm_volume.py --quick             # smoke run: 16e4 and 64e8, EP as given
    python benchmarks/comm_volume.py --ep 4 --shapes 16e4 64e8 --out benchmarks/results/cv
    python benchmarks/comm_volume.py --nodes 2 2 4 8 --gpus-per-node 2 4 2 8 --trained-shapes all
                                                         # node mode: see node_volume.py

Node mode (``--nodes``/``--gpus-per-node``): inter-node and intra-node rows per token for
Megatron's alltoall, flex+DeepEP-style, our flat dedup and our two-level dispatcher on simulated
nodes (real gloo dispatchers up to ``--max-gloo-ranks``, the analytic counter they are checked
against above), node-limited routings, hierarchical placement, busiest GPU / rank / node over the
mean. Everything about it is in ``benchmarks/node_volume.py`` (measurement, column definitions)
and ``benchmarks/node_report.py`` (tables, plot, exit status); the rest of this docstring is the
flat EP mode. Shared pieces (shapes, trained models, placements, spawning): ``volume_lib.py``.

Time on 2 CPU cores (measured on a shared machine): the default run 3 min the first time (trains
two tiny models, then caches them); ``--trained-shapes all`` 2 min with cached models, 36 min the
first time under a load average of ~15 from other jobs (13 min of it training; 256e top-8 is the
slow one).

What is measured. For every (shape, EP size P, routing, placement) the token routing is fed to the
real ``DedupAlltoAllTokenDispatcher`` in P gloo processes (one process per EP rank, spawned once per
P): dispatch preprocess -> all-to-all -> expand -> pre-combine -> all-to-all back -> combine. Rows
per token are read from the dispatcher's ``comm_stats`` (summed over ranks): ``rows_dispatched``
(ours, one row per (token, destination rank)) and ``megatron_rows_dispatched`` (what Megatron's
alltoall ships for the same routing: one row per (token, expert) = k). The combine direction ships
the same number of rows (checked). Every call also checks that the output equals the input (probs
sum to 1) and that the counters equal ``comm.count_rows`` of the routing map. Hidden size is tiny
(rows, not time, are measured).

Columns: alltoall (k) | dedup only (Megatron's contiguous expert blocks) | dedup + planned
placement | dedup + balanced placement (planned with every rank's expected load <= 1.10x the
mean, the planner's ``max_load_imbalance``, when it has one) | the physical minimum
ceil(k / (E/P)); then the busiest rank's load (expert input rows) and received rows (one per
(token, rank)) over the mean, per placement (issue 15: before = Megatron's blocks, after =
planned / balanced).

Routings:
    uniform random      each token picks k of E uniformly; must match
                        P * (1 - C(E - E/P, k) / C(E, k)) within 2% (checked; exit 1 otherwise)
    trained top-k       router logits of a tiny plain top-k model trained with the CPU trainer
                        (``megatron-c2r train``: 4 layers, d=128, aux loss 0.01, EP=1) on the
                        byte corpus, run on held-out tokens. Co-activation counts, top-T
                        lists and the planned placement come from the first half of those
                        sequences; every routing is measured on the other half. All four layers.
    C2R T=...           the paper's rule (top-1 free, k-1 from its top-T collaborators) on the
                        same logits
    group M=1/2         our group mode on the planned groups (group = EP rank): 'anchored' (top-1
                        expert's group + best other groups) and 'group-score' (Megatron's group
                        selection rule on the planned groups)
    Megatron g-limited  ``moe_utils.group_limited_topk`` with groups = P (contiguous blocks),
                        group_topk 1 / 2
    MoGE                ``c2r.mode=group_balanced`` (Pangu Pro MoE): exactly k/P experts from each
                        rank's contiguous block (where P divides k): every rank gets the same
                        rows, every token visits every rank

Trained models are cached under ``<out>/models/`` (a rerun with the same settings reuses them).
Writes ``<out>/comm_volume.md``, ``<out>/comm_volume.json`` (and ``--json PATH``) and
``<out>/comm_volume.png``; ``--docs DIR`` writes the ``flat`` section of ``DIR/comm_volume.md``.

Legend for shape suffixes: L MoE layers (first axis of stacked routings), T tokens, E experts,
K top-k, P EP ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.flat_report import (  # noqa: E402 - after the sys.path line (script use)
    LOAD_BOUND,
    MAX_GROUPS,
    detail_table,
    formula_checks,
    plot,
    summary_rows,
    summary_table,
)
from benchmarks.volume_lib import (  # noqa: E402
    SHAPES,
    moge_indices,
    plan_placements,
    planner_supports,
    relabel,
    run_world,
    trained_logits,
    write_doc_section,
    write_json,
)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: shapes 16e4 64e8, 4k uniform tokens, one tiny model (16e4) "
                        "trained for 60 steps (its routing is not yet representative)")
    p.add_argument("--ep", type=int, nargs="+", default=[4, 8], help="EP sizes (gloo processes)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--trained-shapes", nargs="*", choices=[*SHAPES, "all"], default=None,
                   help="shapes that get a trained tiny model ('all': every shape; default 16e4 "
                        "64e8, --quick 16e4); the others report n/a for trained routings")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps of each tiny model (default 150, --quick 60)")
    p.add_argument("--aux-loss-coeff", type=float, default=0.01,
                   help="load-balancing aux loss coefficient of the tiny models")
    p.add_argument("--capture-batches", type=int, default=16,
                   help="held-out batches of 8 x 128 tokens whose router logits are captured "
                        "(first half: profiling, second half: measurement)")
    p.add_argument("--uniform-tokens", type=int, default=None,
                   help="tokens for the uniform-random rows (default 16384, --quick 4096)")
    p.add_argument("--hidden", type=int, default=8, help="hidden size of the shipped rows")
    p.add_argument("--workers", type=int, default=2, help="tiny models trained in parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "comm_volume"))
    p.add_argument("--docs", default=None,
                   help="also write the tables into <docs>/comm_volume.md (this mode's section) "
                        "and the plot into the folder (e.g. docs)")
    p.add_argument("--json", default=None, help="also write the JSON records to this path")
    nodes = p.add_argument_group("node mode (two-level dispatcher; benchmarks/node_volume.py)")
    nodes.add_argument("--nodes", type=int, nargs="+", default=None,
                       help="nodes N of each measured topology (paired with --gpus-per-node); "
                            "selects the node mode, --ep is then ignored")
    nodes.add_argument("--gpus-per-node", type=int, nargs="+", default=None,
                       help="EP ranks per node G, one per --nodes value (or one for all)")
    nodes.add_argument("--render-json", default=None, metavar="JSON",
                       help="rebuild the node tables and plot from a saved node-mode JSON (its "
                            "own command and records) without measuring")
    nodes.add_argument("--max-gloo-ranks", type=int, default=8,
                       help="topologies with N*G <= this run the real dispatchers in N*G gloo "
                            "processes; larger ones use the analytic counter the small runs "
                            "prove equal to the dispatchers' counters")
    args = p.parse_args(argv)
    if (args.nodes is None) != (args.gpus_per_node is None):
        p.error("--nodes and --gpus-per-node go together (the node mode needs both)")
    if args.nodes is not None:
        if len(args.gpus_per_node) == 1:
            args.gpus_per_node = args.gpus_per_node * len(args.nodes)
        if len(args.nodes) == 1:
            args.nodes = args.nodes * len(args.gpus_per_node)
        if len(args.nodes) != len(args.gpus_per_node) or min(args.nodes + args.gpus_per_node) < 1:
            p.error(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be "
                    "positive and pair up (same count, or one value for all)")
        args.topologies = list(zip(args.nodes, args.gpus_per_node))
    if args.quick and args.shapes == list(SHAPES):
        args.shapes = ["16e4", "64e8"]
    if args.trained_shapes is None:
        args.trained_shapes = ["16e4"] if args.quick else ["16e4", "64e8"]
    elif "all" in args.trained_shapes:
        args.trained_shapes = list(SHAPES)
    args.trained_shapes = [s for s in args.trained_shapes if s in args.shapes]
    args.train_steps = args.train_steps or (60 if args.quick else 150)
    args.uniform_tokens = args.uniform_tokens or (4096 if args.quick else 16384)
    if args.capture_batches < 2 or args.capture_batches % 2:
        p.error(f"--capture-batches {args.capture_batches} must be even and >= 2 (two halves)")
    return args


def build_cases(key: str, ep: int, uniform_tokens: int, trained: dict | None, seed: int):
    """(cases, not_applicable) for one shape at one EP size.

    A case = {routing, placement, indices [L, T, K] int32 in the measured labelling}; T is a
    multiple of ``ep`` (each rank takes a contiguous slice). Not applicable = {routing,
    placement, reason}."""
    from megatron.core.transformer.moe.moe_utils import group_limited_topk

    from megatron_c2r.collaboration import coactivation_counts, top_t_lists
    from megatron_c2r.routing.functional import c2r_topk, group_topk, selection_scores

    shape = SHAPES[key]
    E, k = shape["experts"], shape["topk"]
    local = E // ep
    cases, na = [], []

    def add(routing, placement, indices_LTK):
        T = indices_LTK.shape[1] // ep * ep
        indices_LTK = indices_LTK[:, :T]
        # Expert-input rows per EP rank (what each rank's experts compute), busiest / mean,
        # averaged over layers: placement and routing rules move load between ranks.
        load_LP = torch.stack([torch.bincount(idx_TK.flatten() // local, minlength=ep)
                               for idx_TK in indices_LTK]).double()
        imbalance = float((load_LP.max(dim=1).values / load_LP.mean(dim=1)).mean())
        # Rows each rank receives from the dedup dispatcher: one per (token, rank).
        recv_LP = torch.stack([torch.zeros(T, ep, dtype=torch.bool).scatter_(
            1, idx_TK.long() // local, True).sum(dim=0) for idx_TK in indices_LTK]).double()
        received = float((recv_LP.max(dim=1).values / recv_LP.mean(dim=1)).mean())
        cases.append(dict(routing=routing, placement=placement, rank_load_imbalance=imbalance,
                          rank_received_imbalance=received,
                          indices=indices_LTK.to(torch.int32).contiguous()))

    # Uniform random: measured tokens and an independent profiling sample for the planner.
    g = torch.Generator().manual_seed(seed * 7919 + E * 31 + k)
    measure_TK = torch.rand(uniform_tokens, E, generator=g).topk(k, dim=1).indices
    profile_TK = torch.rand(uniform_tokens, E, generator=g).topk(k, dim=1).indices
    plans = plan_placements(profile_TK[None], E, ep, seed)
    add("uniform", "megatron", measure_TK[None])
    add("uniform", "planned", relabel(measure_TK[None], plans))

    trained_names = (["trained_topk"] + [f"c2r_T{t}" for t in shape["top_t"]]
                     + [f"{sel}_M{m}" for m in MAX_GROUPS for sel in ("anchored", "group_score")]
                     + [f"megatron_gl_M{m}" for m in MAX_GROUPS] + ["moge"])
    if trained is None:
        na.append(dict(routing="trained", routings=trained_names,
                       reason="no trained model for this shape: not in --trained-shapes (the "
                              "default trains 16e4 and 64e8 to keep the run short; "
                              "--trained-shapes all trains every shape)"))
        return cases, na

    logits_LTE = trained["logits_LTE"]
    half = logits_LTE.shape[1] // 2  # = the first half of the held-out sequences
    scores_LTE = selection_scores(logits_LTE, score_function="softmax", use_pre_softmax=False,
                                  expert_bias_E=None)  # the tiny model: softmax, no pre-softmax
    profile_LTE, measure_LTE = scores_LTE[:, :half], scores_LTE[:, half:]
    profile_top_LTK = profile_LTE.topk(k, dim=-1).indices
    plans = plan_placements(profile_top_LTK, E, ep, seed)
    counts_LEE = [coactivation_counts(
        torch.zeros(half, E, dtype=torch.bool).scatter_(1, top_TK, True)) for top_TK in profile_top_LTK]

    topk_LTK = measure_LTE.topk(k, dim=-1).indices
    add("trained_topk", "megatron", topk_LTK)
    c2r_by_t = {t: torch.stack([c2r_topk(s_TE, k, top_t_lists(c_EE, t))[1]
                                for s_TE, c_EE in zip(measure_LTE, counts_LEE)])
                for t in shape["top_t"]}
    for t, c2r_LTK in c2r_by_t.items():
        add(f"c2r_T{t}", "megatron", c2r_LTK)
    # Planned placements: locality only, and (issue 15) with every rank's expected load bounded.
    planned = {"planned": plans}
    if planner_supports("max_load_imbalance"):
        planned["balanced"] = plan_placements(profile_top_LTK, E, ep, seed,
                                              max_load_imbalance=LOAD_BOUND)
    for placement, layer_plans in planned.items():
        add("trained_topk", placement, relabel(topk_LTK, layer_plans))
        for t, c2r_LTK in c2r_by_t.items():
            add(f"c2r_T{t}", placement, relabel(c2r_LTK, layer_plans))
    for m in MAX_GROUPS:
        if k > m * local or m > ep:
            reason = f"k={k} > M*E/P = {m}*{local}: {m} rank(s) cannot hold k experts"
            for name in (f"anchored_M{m}", f"group_score_M{m}", f"megatron_gl_M{m}"):
                na.append(dict(routing=name, reason=reason))
            continue
        for placement, layer_plans in planned.items():
            for sel in ("anchored", "group_score"):
                group_LTK = torch.stack([
                    group_topk(s_TE, k, torch.tensor(plan.expert_to_rank), ep, m,
                               anchored=sel == "anchored")[1]
                    for s_TE, plan in zip(measure_LTE, layer_plans)])
                add(f"{sel}_M{m}", placement, relabel(group_LTK, layer_plans))
        gl_LTK = torch.stack([group_limited_topk(s_TE, k, s_TE.shape[0], E, ep, m)[1]
                              for s_TE in measure_LTE])
        add(f"megatron_gl_M{m}", "megatron", gl_LTK)
    # MoGE (issue 18): k/P experts from each rank's contiguous block, the balance end (every
    # rank gets exactly T*k/P rows).
    moge_LTK = moge_indices(measure_LTE, k, ep)
    if moge_LTK is None:
        na.append(dict(routing="moge", reason=f"P={ep} does not divide k={k}: MoGE takes k/P per rank"))
    else:
        add("moge", "megatron", moge_LTK)
    return cases, na


# ------------------------------------------------------------------------------------------------
# 3. Measurement on every rank of a gloo world of size P (spawned once per P; tests reuse it)
# ------------------------------------------------------------------------------------------------
def _dispatcher(experts: int, topk: int, hidden: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_c2r.moe.dispatcher import DedupAlltoAllTokenDispatcher

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=1, ffn_hidden_size=hidden,
        num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=hidden,
        moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
        add_bias_linear=False, bf16=False, params_dtype=torch.float32,
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = experts // world
    return DedupAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config)


def measure_jobs(jobs_path: str, hidden: int = 8, progress: bool = False) -> list[dict]:
    """Run every case of ``jobs_path`` (a torch file: list of {shape, experts, topk, cases})
    through the dedup dispatcher on this gloo world (all ranks call it together; EP = world size).
    Rank r takes tokens [r*T/P, (r+1)*T/P) of each case. Returns per-case totals summed over
    ranks (identical on every rank). Side effect: (re)initialises Megatron's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_c2r.comm.accounting import count_rows

    rank, world = dist.get_rank(), dist.get_world_size()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    jobs = torch.load(jobs_path, weights_only=True)
    bar = tqdm(total=sum(len(j["cases"]) for j in jobs), desc=f"EP={world} gloo dispatch",
               unit="case", disable=not (progress and rank == 0))
    gen = torch.Generator().manual_seed(rank)
    results = []
    for job in jobs:
        E, k = job["experts"], job["topk"]
        dispatcher = _dispatcher(E, k, hidden)
        for case in job["cases"]:
            indices_LTK = case["indices"]
            layers, T = indices_LTK.shape[0], indices_LTK.shape[1] // world
            mine_LTK = indices_LTK[:, rank * T:(rank + 1) * T].long()
            dispatcher.comm_stats.reset()
            # per layer: rows, routed tokens; then checks: output == input, counters == count_rows
            per_layer_L2 = torch.zeros(layers, 2, dtype=torch.float64)
            checks_failed = 0
            for layer in range(layers):
                routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, mine_LTK[layer], True)
                probs_TE = routing_map_TE.float() / k  # sums to 1 per token -> combine = identity
                x_TH = torch.randn(T, 1, hidden, generator=gen)
                # 1. dispatch: one row per (token, destination rank) -> all-to-all -> expand
                tokens, probs = dispatcher.dispatch_preprocess(x_TH, routing_map_TE, probs_TE)
                x_QH, meta_QM = dispatcher.token_dispatch(tokens, probs)
                x_NH, _, probs_N = dispatcher.dispatch_postprocess(x_QH, meta_QM)
                # 2. "experts" = identity weighted by probs; pre-combine -> all-to-all back -> sum
                y_QH = dispatcher.combine_preprocess(x_NH * probs_N.unsqueeze(1))
                out_TH = dispatcher.combine_postprocess(dispatcher.token_combine(y_QH))
                last = dispatcher.last_stats
                oracle = count_rows(routing_map_TE, world, rank)
                checks_failed += int(not torch.allclose(out_TH, x_TH, atol=1e-5))
                checks_failed += int(oracle["rows"] != last.rows_dispatched
                                     or oracle["megatron_rows"] != last.megatron_rows_dispatched
                                     or x_QH.shape[0] != last.rows_combined)
                per_layer_L2[layer] = torch.tensor([last.rows_dispatched, last.routed_tokens])
            s = dispatcher.comm_stats
            totals = torch.tensor(
                [s.tokens, s.routed_tokens, s.rows_dispatched, s.rows_dispatched_remote,
                 s.rows_combined, s.rows_combined_remote, s.megatron_rows_dispatched,
                 s.megatron_rows_dispatched_remote,
                 s.bytes_dispatched_remote + s.bytes_combined_remote,
                 s.megatron_bytes_dispatched_remote + s.megatron_bytes_combined_remote,
                 checks_failed], dtype=torch.float64)
            dist.all_reduce(totals)
            dist.all_reduce(per_layer_L2)
            (tokens, routed, rows, rows_remote, rows_back, _rows_back_remote, mrows, mrows_remote,
             bytes_ours, bytes_megatron, failed) = totals.tolist()
            results.append(dict(
                shape=job["shape"], ep=world, routing=case["routing"], placement=case["placement"],
                tokens=int(tokens), layers=layers,
                rows_per_token=rows / routed,
                rows_per_token_alltoall=mrows / routed,
                remote_rows_per_token=rows_remote / routed,
                remote_rows_per_token_alltoall=mrows_remote / routed,
                combine_rows_per_token=rows_back / routed,
                remote_byte_reduction=bytes_megatron / max(bytes_ours, 1.0),
                rows_per_token_by_layer=(per_layer_L2[:, 0] / per_layer_L2[:, 1]).tolist(),
                rank_load_imbalance=case["rank_load_imbalance"],
                rank_received_imbalance=case["rank_received_imbalance"],
                checks_failed=int(failed),
            ))
            bar.update(1)
    bar.close()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # One thread: the counting and planning ops are small, and on a shared 2-core machine
    # intra-op threads make them ~100x slower (8192 tokens x 256e: 2.6 s vs 0.03 s).
    torch.set_num_threads(1)
    if args.nodes is not None or args.render_json:
        from benchmarks.node_report import main_nodes  # the node mode lives in its own modules

        return main_nodes(args, argv)
    t0 = time.perf_counter()
    trained = trained_logits(args) if args.trained_shapes else {}

    # Routings and placements for every (shape, EP); one jobs file per EP size.
    from tqdm import tqdm

    na_by_key, jobs_by_ep = {}, {ep: [] for ep in args.ep}
    combos = [(key, ep) for key in args.shapes for ep in args.ep]
    for key, ep in tqdm(combos, desc="routings + placement plans", unit="shape x EP"):
        s = SHAPES[key]
        if s["experts"] % ep:
            na_by_key[(key, ep)] = []
            continue
        cases, na = build_cases(key, ep, args.uniform_tokens, trained.get(key), args.seed)
        na_by_key[(key, ep)] = na
        jobs_by_ep[ep].append(dict(shape=key, experts=s["experts"], topk=s["topk"], cases=cases))

    results = []
    for ep in args.ep:
        if not jobs_by_ep[ep]:
            continue
        jobs_path = os.path.join(args.out, f"cases_ep{ep}.pt")
        torch.save(jobs_by_ep[ep], jobs_path)
        results += run_world(ep, measure_jobs, jobs_path, args.hidden, True)
        os.remove(jobs_path)

    checks = formula_checks(results)
    failed = [r for r in results if r["checks_failed"]]
    rows = summary_rows(args, results, trained)
    settings = (f"trained models: {args.train_steps} steps, 4 layers, d=128, plain top-k, aux "
                f"loss 0.01 (configs/tiny_cpu.yaml at EP=1); logits of {args.capture_batches // 2} "
                f"x 8 x 128 held-out tokens profile, {args.capture_batches // 2} x 8 x 128 measure; "
                f"uniform: {args.uniform_tokens} tokens")
    cmd = "python benchmarks/comm_volume.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [f"Rows shipped per token (dispatch; combine ships the same), measured with `{cmd.strip()}`",
          f"({settings}).", "", *summary_table(rows), "", "Every routing:", "",
          *detail_table(args, results, na_by_key), "",
          "Uniform-routing formula checks P*(1-C(E-E/P,k)/C(E,k)), tolerance 2%:", ""]
    for c in checks:
        md.append(f"- {SHAPES[c['shape']]['label']} EP={c['ep']}: measured {c['measured']:.3f} "
                  f"vs formula {c['formula']:.3f} ({100 * c['rel_error']:+.2f}%) "
                  f"{'OK' if c['ok'] else 'FAIL'}")
    text = "\n".join(md) + "\n"
    print("\n" + text)
    with open(os.path.join(args.out, "comm_volume.md"), "w", encoding="utf-8") as f:
        f.write(text)
    payload = dict(command=cmd.strip(), settings=settings, summary=rows, results=results,
                   formula_checks=checks,
                   not_applicable=[dict(shape=k[0], ep=k[1], **v)
                                   for k, items in na_by_key.items() for v in items],
                   trained={k: dict(val_loss=v["val_loss"], model_dir=v["model_dir"])
                            for k, v in trained.items()},
                   wall_s=time.perf_counter() - t0)
    for path in [os.path.join(args.out, "comm_volume.json")] + ([args.json] if args.json else []):
        write_json(path, payload)
    png = os.path.join(args.out, "comm_volume.png")
    plot(rows, args.ep, png)
    if args.docs:
        import shutil

        os.makedirs(args.docs, exist_ok=True)
        shutil.copy(png, os.path.join(args.docs, "comm_volume.png"))
        write_doc_section(os.path.join(args.docs, "comm_volume.md"), "flat", text)
    print(f"wrote {args.out}/comm_volume.{{md,json,png}} in {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"FAILED dispatcher checks (output != input or counters != count_rows): {failed}")
        return 1
    if not all(c["ok"] for c in checks):
        print("FAILED: uniform routing is off the formula by more than 2%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
