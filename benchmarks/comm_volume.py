"""Rows shipped per token by the EP communicator, measured from its own counters on real gloo
all-to-alls, side by side for Megatron's alltoall, our dedup dispatcher, planned placement and
constrained routing.

    python benchmarks/comm_volume.py                     # EP=4 and 8, five shapes, 2 trained
    python benchmarks/comm_volume.py --trained-shapes all --docs docs   # the README table
    python benchmarks/comm_volume.py --quick             # smoke run: 16e4 and 64e8, EP as given
    python benchmarks/comm_volume.py --ep 4 --shapes 16e4 64e8 --out benchmarks/results/cv

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
placement | the physical minimum ceil(k / (E/P)).

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

Trained models are cached under ``<out>/models/`` (a rerun with the same settings reuses them).
Writes ``<out>/comm_volume.md``, ``<out>/comm_volume.json`` and ``<out>/comm_volume.png``.

Legend for shape suffixes: L MoE layers (first axis of stacked routings), T tokens, E experts,
K top-k, P EP ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {
    # key: label, experts, top-k, expert FFN size of the tiny trained model, top-T values
    # (E/2-1 and E/4-1; the paper's T for its two shapes: 8e T=5, 60e T=30).
    "8e2": dict(label="Mixtral-like 8e top-2", experts=8, topk=2, moe_ffn=128, top_t=(5, 3, 1)),
    "16e4": dict(label="16e top-4", experts=16, topk=4, moe_ffn=128, top_t=(7, 3)),
    "60e4": dict(label="Qwen1.5-like 60e top-4", experts=60, topk=4, moe_ffn=32, top_t=(30, 14)),
    "64e8": dict(label="OLMoE-like 64e top-8", experts=64, topk=8, moe_ffn=32, top_t=(31, 15)),
    "256e8": dict(label="DeepSeek-V3-like 256e top-8", experts=256, topk=8, moe_ffn=16,
                  top_t=(127, 63)),
}
MAX_GROUPS = (1, 2)
PLACEMENTS = ("megatron", "planned")  # contiguous expert blocks (dedup only) / planned


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
                   help="also copy the table and the plot into this folder (e.g. docs)")
    args = p.parse_args(argv)
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


def minimum_rows(experts: int, topk: int, ep: int) -> int:
    """Fewest ranks a token with k experts can touch: ceil(k / (E/P))."""
    return math.ceil(topk / (experts // ep))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# 1. Trained tiny models: router logits on held-out tokens
# ------------------------------------------------------------------------------------------------
def _train_settings(key: str, args) -> dict:
    shape = SHAPES[key]
    return dict(shape=key, experts=shape["experts"], topk=shape["topk"], moe_ffn=shape["moe_ffn"],
                steps=args.train_steps, capture_batches=args.capture_batches, seed=args.seed,
                aux_loss_coeff=args.aux_loss_coeff, config="configs/tiny_cpu.yaml")


def train_and_capture(settings: dict, model_dir: str) -> str:
    """Train a plain top-k tiny model (one gloo process, EP=1) and save its routers' logits on
    ``capture_batches`` held-out batches: ``logits.pt`` = {"logits_LTE": fp32 [layers, T, E]},
    tokens in batch order (the first half of T are the first half of the sequences). Runs in a
    fresh process (it initialises a one-rank torch.distributed world). Returns the file path.

    Held-out tokens: the last samples of the shuffled training split, which training never reads
    (it reads samples [0, steps * 8)). Not the validation split: that is the last 5% of the corpus
    documents in path order, whose routing is far less typical (busiest expert 3.5x the mean load
    vs 2x on unseen training-split samples, 16e top-4 after 150 steps).
    """
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from megatron_c2r.cpu.job_config import load_cpu_config
        from megatron_c2r.cpu.trainer import Trainer
        from megatron_c2r.moe.router import c2r_routers

        sets = [
            "megatron.expert-model-parallel-size=1",
            f"megatron.num-experts={settings['experts']}",
            f"megatron.moe-router-topk={settings['topk']}",
            f"megatron.moe-ffn-hidden-size={settings['moe_ffn']}",
            f"megatron.seed={1234 + settings['seed']}",
            f"megatron.moe-aux-loss-coeff={settings['aux_loss_coeff']}",
            "c2r.mode=topk", "c2r.warmup_steps=0",
            "cpu.replan=false", "cpu.plot=false", "cpu.progress=false", "cpu.threads=1",
        ]
        cfg = load_cpu_config(os.path.join(ROOT, settings["config"]), sets,
                              train_iters=settings["steps"], out_dir=model_dir)
        trainer = Trainer(cfg, 0)
        trainer.train()
        # Router logits on held-out batches: a forward hook recomputes the router's own
        #    linear on the hidden states it was given (logits -> scores -> probs, routing_map).
        routers = list(c2r_routers(trainer.model))
        captured: list[list[torch.Tensor]] = [[] for _ in routers]

        def hook(i):
            def fn(module, args, _out):
                captured[i].append(module.gating(args[0]).reshape(-1, settings["experts"]).float())
            return fn

        handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
        trainer.model.eval()
        mb, dataset = cfg.micro_batch_size, trainer.train_ds
        first = len(dataset) - settings["capture_batches"] * mb
        if first < cfg.train_iters * mb:
            raise ValueError(f"the training split has {len(dataset)} samples: too few to hold out "
                             f"{settings['capture_batches']} batches after {cfg.train_iters} steps")
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        with torch.no_grad():
            for b in range(settings["capture_batches"]):
                samples = [dataset[first + b * mb + i] for i in range(mb)]
                trainer._loss({k: torch.stack([x[k] for x in samples]) for k in keys})
        for h in handles:
            h.remove()
        logits_LTE = torch.stack([torch.cat(chunks) for chunks in captured])
        with open(os.path.join(model_dir, "summary.json"), encoding="utf-8") as f:
            val_loss = json.load(f).get("val_loss")
        path = os.path.join(model_dir, "logits.pt")
        torch.save({"logits_LTE": logits_LTE}, path)
        with open(os.path.join(model_dir, "settings.json"), "w", encoding="utf-8") as f:
            json.dump({**settings, "val_loss": val_loss}, f, indent=1)
        return path
    finally:
        dist.destroy_process_group()


def trained_logits(args) -> dict[str, dict]:
    """{shape: {"logits_LTE", "val_loss"}} for the trained shapes; trains what is not cached."""
    from tqdm import tqdm

    todo, out = {}, {}
    for key in args.trained_shapes:
        settings = _train_settings(key, args)
        model_dir = os.path.join(args.out, "models", f"{key}_steps{args.train_steps}_aux"
                                 f"{args.aux_loss_coeff:g}_cap{args.capture_batches}_seed{args.seed}")
        cached = os.path.join(model_dir, "settings.json")
        if os.path.exists(cached) and os.path.exists(os.path.join(model_dir, "logits.pt")):
            with open(cached, encoding="utf-8") as f:
                if {k: v for k, v in json.load(f).items() if k != "val_loss"} == settings:
                    out[key] = model_dir
                    continue
        todo[key] = (settings, model_dir)
    if todo:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx,
                                 max_tasks_per_child=1) as pool:
            futures = {key: pool.submit(train_and_capture, *todo[key]) for key in todo}
            bar = tqdm(total=len(futures), desc=f"training tiny models ({args.train_steps} steps)",
                       unit="model")
            for key, fut in futures.items():
                fut.result()
                out[key] = todo[key][1]
                bar.update(1)
            bar.close()
    result = {}
    for key, model_dir in out.items():
        with open(os.path.join(model_dir, "settings.json"), encoding="utf-8") as f:
            val_loss = json.load(f).get("val_loss")
        logits = torch.load(os.path.join(model_dir, "logits.pt"), weights_only=True)["logits_LTE"]
        result[key] = dict(logits_LTE=logits, val_loss=val_loss, model_dir=model_dir)
    return result


# ------------------------------------------------------------------------------------------------
# 2. Routings (pure, main process): top-k ids per token, relabelled to the measured placement
# ------------------------------------------------------------------------------------------------
def plan_placements(profile_top_LTK: torch.Tensor, experts: int, ep: int, seed: int) -> list:
    """One ``LayerPlan`` per layer from the profiling half's top-k sets (exact objective)."""
    from megatron_c2r.placement.planner import PlannerConfig, plan_layer
    from megatron_c2r.placement.sources import LayerCollab

    cfg = PlannerConfig(ep_size=ep, seed=seed)
    return [plan_layer(LayerCollab.from_top_indices(top_TK.numpy(), experts), cfg)
            for top_TK in profile_top_LTK]


def relabel(indices_LTK: torch.Tensor, plans: list | None) -> torch.Tensor:
    """Old expert ids -> new ids under each layer's plan (new expert i is old ``order[i]``), so
    EP rank r owns new ids [r*E/P, (r+1)*E/P) as the dispatcher requires."""
    if plans is None:
        return indices_LTK
    out = torch.empty_like(indices_LTK)
    for layer, plan in enumerate(plans):
        new_of_old_E = torch.argsort(torch.tensor(plan.order))
        out[layer] = new_of_old_E[indices_LTK[layer]]
    return out


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
        cases.append(dict(routing=routing, placement=placement, rank_load_imbalance=imbalance,
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
                     + [f"megatron_gl_M{m}" for m in MAX_GROUPS])
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
    add("trained_topk", "planned", relabel(topk_LTK, plans))
    for t in shape["top_t"]:
        c2r_LTK = torch.stack([c2r_topk(s_TE, k, top_t_lists(c_EE, t))[1]
                               for s_TE, c_EE in zip(measure_LTE, counts_LEE)])
        add(f"c2r_T{t}", "megatron", c2r_LTK)
        add(f"c2r_T{t}", "planned", relabel(c2r_LTK, plans))
    for m in MAX_GROUPS:
        if k > m * local or m > ep:
            reason = f"k={k} > M*E/P = {m}*{local}: {m} rank(s) cannot hold k experts"
            for name in (f"anchored_M{m}", f"group_score_M{m}", f"megatron_gl_M{m}"):
                na.append(dict(routing=name, reason=reason))
            continue
        for sel in ("anchored", "group_score"):
            group_LTK = torch.stack([
                group_topk(s_TE, k, torch.tensor(plan.expert_to_rank), ep, m,
                           anchored=sel == "anchored")[1]
                for s_TE, plan in zip(measure_LTE, plans)])
            add(f"{sel}_M{m}", "planned", relabel(group_LTK, plans))
        gl_LTK = torch.stack([group_limited_topk(s_TE, k, s_TE.shape[0], E, ep, m)[1]
                              for s_TE in measure_LTE])
        add(f"megatron_gl_M{m}", "megatron", gl_LTK)
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
                x_RH, meta_RM = dispatcher.dispatch_preprocess(x_TH, routing_map_TE, probs_TE)
                x_QH, meta_QM = dispatcher.token_dispatch(x_RH, meta_RM)
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
                checks_failed=int(failed),
            ))
            bar.update(1)
    bar.close()
    return results


def _ep_worker(rank: int, world: int, port: int, jobs_path: str, hidden: int, queue) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = measure_jobs(jobs_path, hidden, progress=True)
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


def run_ep(ep: int, jobs_path: str, hidden: int) -> list[dict]:
    """Spawn ``ep`` gloo processes once, measure every case of ``jobs_path``, join them."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, ep, port, jobs_path, hidden, queue))
             for r in range(ep)]
    for proc in procs:
        proc.start()
    results = None
    while results is None:
        try:
            results = queue.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: check the workers are alive
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank of the EP={ep} run failed (traceback above)")
    for proc in procs:
        proc.join()
    return results


# ------------------------------------------------------------------------------------------------
# 4. Report: formula checks, tables, JSON, plot
# ------------------------------------------------------------------------------------------------
ROUTING_LABELS = {"uniform": "uniform random", "trained_topk": "trained top-k",
                  "trained": "trained top-k, C2R, group, group-limited"}


def routing_label(name: str, ep: int) -> str:
    if name in ROUTING_LABELS:
        return ROUTING_LABELS[name]
    if name.startswith("c2r_T"):
        return f"C2R T={name[5:]}"
    m = name.rsplit("_M", 1)[1]
    if name.startswith("anchored"):
        return f"group M={m}, anchored"
    if name.startswith("group_score"):
        return f"group M={m}, group-score"
    return f"Megatron group-limited {m} of {ep}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _load(result: dict | None) -> str:
    return "—" if result is None else f"{result['rank_load_imbalance']:.2f}"


def formula_checks(results: list[dict]) -> list[dict]:
    from megatron_c2r.comm.accounting import expected_ranks_per_token_uniform

    checks = []
    for r in results:
        if r["routing"] == "uniform" and r["placement"] == "megatron":
            s = SHAPES[r["shape"]]
            want = expected_ranks_per_token_uniform(s["experts"], s["topk"], r["ep"])
            err = r["rows_per_token"] / want - 1
            checks.append(dict(shape=r["shape"], ep=r["ep"], measured=r["rows_per_token"],
                               formula=want, rel_error=err, ok=abs(err) <= 0.02))
    return checks


def index_results(results: list[dict]) -> dict:
    return {(r["shape"], r["ep"], r["routing"], r["placement"]): r for r in results}


def detail_table(args, results, na_by_key) -> list[str]:
    """Every routing: alltoall | dedup only | dedup + planned | minimum."""
    idx = index_results(results)
    lines = [("| shape | EP | routing | alltoall (k) | dedup only | dedup + planned placement "
              "| minimum | alltoall / best | busiest rank load / mean (Megatron, planned) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for key in args.shapes:
        s = SHAPES[key]
        for ep in args.ep:
            if s["experts"] % ep:
                lines.append(f"| {s['label']} | {ep} | all | n/a: {s['experts']} experts are "
                             f"not divisible by EP={ep} |  |  |  |  |  |")
                continue
            routings = []
            for r in results:
                if r["shape"] == key and r["ep"] == ep and r["routing"] not in routings:
                    routings.append(r["routing"])
            for name in routings:
                a, b = idx.get((key, ep, name, "megatron")), idx.get((key, ep, name, "planned"))
                alltoall = (a or b)["rows_per_token_alltoall"]
                best = min(x["rows_per_token"] for x in (a, b) if x)
                lines.append(
                    f"| {s['label']} | {ep} | {routing_label(name, ep)} | {alltoall:.2f} | "
                    f"{_fmt(a and a['rows_per_token']) if a else '—'} | "
                    f"{_fmt(b and b['rows_per_token']) if b else '—'} | "
                    f"{minimum_rows(s['experts'], s['topk'], ep)} | {alltoall / best:.2f}x | "
                    f"{_load(a)}, {_load(b)} |")
            for item in na_by_key.get((key, ep), []):
                lines.append(f"| {s['label']} | {ep} | {routing_label(item['routing'], ep)} | "
                             f"n/a: {item['reason']} |  |  |  |  |  |")
    return lines


def summary_rows(args, results, trained) -> list[dict]:
    """One row per (shape, EP) in the issue's columns (trained routing, C2R at the smallest T,
    group mode anchored)."""
    idx = index_results(results)
    rows = []
    for key in args.shapes:
        s = SHAPES[key]
        for ep in args.ep:
            row = dict(shape=key, label=s["label"], ep=ep, k=s["topk"],
                       minimum=minimum_rows(s["experts"], s["topk"], ep))
            if s["experts"] % ep:
                row["na"] = f"{s['experts']} experts not divisible by EP={ep}"
                rows.append(row)
                continue

            def get(name, placement, key=key, ep=ep):
                return (idx.get((key, ep, name, placement)) or {}).get("rows_per_token")

            t_min = min(s["top_t"])
            row.update(
                uniform=get("uniform", "megatron"),
                dedup=get("trained_topk", "megatron"),
                planned=get("trained_topk", "planned"),
                c2r=get(f"c2r_T{t_min}", "planned"), c2r_t=t_min,
                anchored_m2=get("anchored_M2", "planned"),
                anchored_m1=get("anchored_M1", "planned"),
                megatron_gl_m1=get("megatron_gl_M1", "megatron"),
                val_loss=(trained.get(key) or {}).get("val_loss"),
            )
            rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> list[str]:
    lines = [("| shape | EP | alltoall (k) | uniform: dedup | trained: dedup only | + planned "
              "placement | + C2R (smallest T, planned) | group M=2 anchored | group M=1 anchored "
              "| minimum |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "na" in r:
            lines.append(f"| {r['label']} | {r['ep']} | {r['k']} | n/a: {r['na']} |  |  |  |  "
                         f"|  | {r['minimum']} |")
            continue
        c2r = "n/a" if r["c2r"] is None else f"{r['c2r']:.2f} (T={r['c2r_t']})"
        lines.append(f"| {r['label']} | {r['ep']} | {r['k']} | {_fmt(r['uniform'])} | "
                     f"{_fmt(r['dedup'])} | {_fmt(r['planned'])} | {c2r} | "
                     f"{_fmt(r['anchored_m2'])} | {_fmt(r['anchored_m1'])} | {r['minimum']} |")
    return lines


def plot(rows: list[dict], eps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("alltoall (k)", "k", "0.55"), ("dedup, uniform routing", "uniform", "#c6dbef"),
              ("dedup, trained top-k", "dedup", "#6baed6"),
              ("+ planned placement", "planned", "#2171b5"),
              ("+ C2R (smallest T)", "c2r", "#fd8d3c"),
              ("group M=2 anchored", "anchored_m2", "#74c476"),
              ("group M=1 anchored", "anchored_m1", "#238b45")]
    fig, axes = plt.subplots(1, len(eps), figsize=(6.5 * len(eps), 4.2), squeeze=False)
    for ax, ep in zip(axes[0], eps):
        mine = [r for r in rows if r["ep"] == ep and "na" not in r]
        width = 0.8 / len(series)
        for j, (label, field, color) in enumerate(series):
            xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(mine))]
            ys = [r.get(field) or 0.0 for r in mine]
            ax.bar(xs, ys, width, label=label, color=color)
        for i, r in enumerate(mine):
            ax.hlines(r["minimum"], i - 0.42, i + 0.42, colors="k", linestyles="dotted",
                      label="physical minimum" if i == 0 else None)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([f"{SHAPES[r['shape']]['experts']}e top-{r['k']}" for r in mine])
        ax.set_ylabel("rows shipped per token (dispatch)")
        ax.set_title(f"EP={ep} (measured on gloo, dedup dispatcher counters)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
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
        results += run_ep(ep, jobs_path, args.hidden)
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
    with open(os.path.join(args.out, "comm_volume.json"), "w", encoding="utf-8") as f:
        json.dump(dict(command=cmd.strip(), settings=settings, summary=rows, results=results,
                       formula_checks=checks,
                       not_applicable=[dict(shape=k[0], ep=k[1], **v)
                                       for k, items in na_by_key.items() for v in items],
                       trained={k: dict(val_loss=v["val_loss"], model_dir=v["model_dir"])
                                for k, v in trained.items()},
                       wall_s=time.perf_counter() - t0), f, indent=1)
    png = os.path.join(args.out, "comm_volume.png")
    plot(rows, args.ep, png)
    if args.docs:
        import shutil

        os.makedirs(args.docs, exist_ok=True)
        shutil.copy(png, os.path.join(args.docs, "comm_volume.png"))
        shutil.copy(os.path.join(args.out, "comm_volume.md"), os.path.join(args.docs, "comm_volume.md"))
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
