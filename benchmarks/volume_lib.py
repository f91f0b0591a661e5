"""Shared pieces of the communication-volume benchmarks (``comm_volume.py`` flat EP mode and
``node_volume.py`` node mode): the shapes, the trained tiny models whose router logits stand in
for trained routing, placement plans and relabelling, spawning one gloo world, and writing one
section of ``docs/comm_volume.md``.

Trained models are cached under ``<out>/models/`` keyed by their settings (a rerun reuses them;
both modes share the cache).

Legend for shape suffixes: L MoE layers (first axis of stacked routings), T tokens, E experts,
K top-k, P EP ranks, D nodes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import sys
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


def free_port() -> int:
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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
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
# 2. Placements: plans from the profiling half, relabelling to the measured placement
# ------------------------------------------------------------------------------------------------
def planner_supports(field: str) -> bool:
    """True when ``placement.planner.PlannerConfig`` has ``field`` (``num_nodes`` for
    hierarchical plans, ``max_load_imbalance`` for load-bounded ones)."""
    import dataclasses

    from megatron_c2r.placement.planner import PlannerConfig

    return field in {f.name for f in dataclasses.fields(PlannerConfig)}


def plan_placements(profile_top_LTK: torch.Tensor, experts: int, ep: int, seed: int,
                    max_load_imbalance: float | None = None) -> list:
    """One ``PlanLayer`` per layer from the profiling half's top-k sets (exact objective); with
    ``max_load_imbalance`` every rank's expected load is bounded (the planner's option)."""
    from megatron_c2r.placement.planner import PlannerConfig, plan_layer
    from megatron_c2r.placement.sources import LayerCollab

    bound = {} if max_load_imbalance is None else dict(max_load_imbalance=max_load_imbalance)
    cfg = PlannerConfig(ep_size=ep, seed=seed, **bound)
    return [plan_layer(LayerCollab.from_top_indices(top_TK.numpy(), experts), cfg, index=i)
            for i, top_TK in enumerate(profile_top_LTK)]


def plan_hierarchical(profile_top_LTK: torch.Tensor, experts: int, nodes: int, gpus_per_node: int,
                      seed: int, max_load_imbalance: float | None = None) -> list:
    """One ``PlanLayer`` per layer, nodes first: experts into ``nodes`` groups (fewest distinct
    nodes per token), then each node's E/D experts into its ``gpus_per_node`` ranks (fewest ranks
    per token inside the node). Group g*G + j = rank j of node g, so node g owns the contiguous
    new ids [g*E/D, (g+1)*E/D) after :func:`relabel`.

    The planner's own hierarchical mode (``PlannerConfig.num_nodes``) when it has one; else the
    same two levels composed here from the flat planner (node level on the exact trace
    objective, rank level on the node's block of the co-activation counts), without a load
    bound (``max_load_imbalance`` then raises NotImplementedError)."""
    import numpy as np

    from megatron_c2r.placement.plan_file import PlanLayer
    from megatron_c2r.placement.planner import PlannerConfig, plan_layer
    from megatron_c2r.placement.sources import LayerCollab

    collabs = [LayerCollab.from_top_indices(top_TK.numpy(), experts) for top_TK in profile_top_LTK]
    if planner_supports("num_nodes"):
        bound = {} if max_load_imbalance is None else dict(max_load_imbalance=max_load_imbalance)
        cfg = PlannerConfig(ep_size=nodes * gpus_per_node, num_nodes=nodes, seed=seed, **bound)
        return [plan_layer(c, cfg, index=i) for i, c in enumerate(collabs)]
    if max_load_imbalance is not None:
        raise NotImplementedError("placement.planner has no max_load_imbalance yet")
    out = []
    for index, collab in enumerate(collabs):
        node_plan = plan_layer(collab, PlannerConfig(ep_size=nodes, seed=seed), index=index)
        groups = []
        for node_experts in node_plan.groups:
            ids = np.asarray(sorted(node_experts), dtype=np.int64)
            if gpus_per_node == 1:
                groups.append(ids.tolist())
                continue
            sub = LayerCollab(counts_EE=collab.counts_EE[np.ix_(ids, ids)], top_k=collab.top_k)
            sub_plan = plan_layer(sub, PlannerConfig(ep_size=gpus_per_node, seed=seed))
            groups += [ids[np.asarray(g, dtype=np.int64)].tolist() for g in sub_plan.groups]
        out.append(PlanLayer.from_groups(index, groups, {}))
    return out


def moge_indices(scores_LTE: torch.Tensor, topk: int, groups: int) -> torch.Tensor | None:
    """MoGE (``c2r.mode=group_balanced``, the router's own selection) on ``groups`` contiguous
    expert blocks: int64 [L, T, K] expert ids, k/G from every group; None when G does not divide k."""
    if topk % groups:
        return None
    from megatron_c2r.routing.moge import group_balanced_topk

    groups_GN = torch.arange(scores_LTE.shape[-1]).view(groups, -1)  # group g = block g
    return torch.stack([group_balanced_topk(s_TE, topk, groups_GN)[1] for s_TE in scores_LTE])


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



# ------------------------------------------------------------------------------------------------
# 3. One gloo world per EP size: every rank runs ``module.fn(*args)``; rank 0's result returns
# ------------------------------------------------------------------------------------------------
def _world_worker(rank: int, world: int, port: int, target: tuple, args: tuple, queue) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = getattr(importlib.import_module(target[0]), target[1])(*args)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run_world(world: int, fn, *args):
    """Spawn ``world`` gloo processes once, run the module-level ``fn(*args)`` on all of them
    together, join them; returns rank 0's result, which must be picklable without tensors (a
    tensor's shared storage dies with the worker). A failing rank ends the run (SystemExit)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    module = fn.__module__
    if module == "__main__":  # a script: import it by its path under ROOT (else its file name,
        path = os.path.abspath(sys.modules["__main__"].__file__)  # its folder is on sys.path)
        rel = os.path.relpath(path, ROOT)
        module = os.path.splitext(os.path.basename(path) if rel.startswith("..") else rel)[0]
        module = module.replace(os.sep, ".")
    target = (module, fn.__name__)
    procs = [ctx.Process(target=_world_worker, args=(r, world, port, target, args, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    result, received = None, False
    while not received:
        try:
            result, received = queue.get(timeout=5), True
        except Exception:  # noqa: BLE001 - queue.Empty: check the workers are alive
            if any(p.exitcode not in (None, 0) for p in procs) or all(
                    p.exitcode == 0 for p in procs):  # failed, or ended without a result
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank of the {world}-process gloo run failed (traceback above)")
    for proc in procs:
        proc.join()
    return result


# ------------------------------------------------------------------------------------------------
# 4. docs/comm_volume.md holds one generated section per mode
# ------------------------------------------------------------------------------------------------
def write_doc_section(path: str, name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``
    of the markdown file ``path`` with ``text``; other sections stay. Atomic (temp + rename)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _m: block, old, count=1) if pattern.search(old) else (
        old + ("\n" if old and not old.endswith("\n\n") else "") + block)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def write_json(path: str, payload) -> None:
    """``json.dump`` to ``path`` atomically (temp + rename), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
