"""The ``megatron-c2r`` command: every subcommand's arguments and error handling, in one place.

    megatron-c2r train    [--config FILE] [--set K=V] [--steps N] [--out DIR] [--resume]
    megatron-c2r pretrain CONFIG.yaml [--set K=V] [--dry-run]    one Megatron-LM process
    megatron-c2r render   CONFIG.yaml [--set K=V] [--format F]   the exact command and env
    megatron-c2r plan     --collab SRC --ep P [--top-k K] [--top-t T] [--out plan.json]
                          [--max-load-imbalance X] [--nodes N | --gpus-per-node G]
    megatron-c2r convert  --load CKPT --plan plan.json --save OUT
    megatron-c2r estimate CONFIG.yaml [--routing SRC] [--nodes N]  modeled MoE-layer time
                          [--baseline-loss F.. --candidate-loss F..] [--recommend]  time to quality

``python -m megatron_c2r ...`` is the same command; ``python -m megatron_c2r.pretrain CONFIG``
is ``pretrain`` for ``torchrun -m`` / ``srun``. Each subcommand is an argument builder and a
``_run_<name>(args) -> exit status`` that calls the library function owning the work
(``run_config``, ``cpu.job_config`` + ``cpu.trainer``, ``render``, ``placement.*``,
``megatron_lm.entry``, ``cost/``). Inputs are validated first and torch/Megatron are imported only after
that, inside the run function, so ``--help`` and every config error take milliseconds.

Errors: any ``errors.USER_ERRORS`` (``ValueError`` and so ``ConfigError``, missing, unwritable or
misplaced paths) raised while a subcommand runs, and any argument error, print ONE line
``megatron-c2r <command>: error: <message>`` on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
import tempfile
from typing import Callable, Dict, NoReturn, Optional, Sequence, Tuple

from megatron_c2r import __version__, parallel
from megatron_c2r.cost.inputs import (
    DENSE_TFLOPS,
    PARAM_HELP,
    TRANSPORTS,
    LinkParams,
    RoutingRule,
    config_rule,
    node_anchored,
    parse_routing,
    shape_from_config,
)
from megatron_c2r.cpu.job_config import load_train_job
from megatron_c2r.errors import USER_ERRORS, one_line
from megatron_c2r.render import FORMATS, render
from megatron_c2r.run_config import load_config

PROG = "megatron-c2r"
DEFAULT_TRAIN_CONFIG = "configs/tiny_cpu.yaml"
# Where --help sends readers (docs/ pages and README sections).
CONFIG_DOC = "docs/config.md"
TRAIN_DOC = "docs/cpu_job.md; README: the first command"
PLACEMENT_DOC = "docs/guide.md: 'Collaboration-aware placement'"
COST_DOC = "docs/cost_model.md"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow our rule: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_set(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a YAML value, e.g. --set {example} (repeatable; the value is YAML, "
        f"null deletes; errors it causes name the --set; rules: {CONFIG_DOC})",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Output paths (checked before anything is written or spawned; nothing is created here)
# --------------------------------------------------------------------------------------------
def check_output_dir(path: str, name: str) -> None:
    """Raise NotADirectoryError / PermissionError (one line naming ``name``, e.g. ``--out``) unless
    ``path`` is, or can be created as, a directory we can write in. Probes the nearest existing
    ancestor with an anonymous temporary file (nothing is left behind)."""
    _check_writable(path, os.path.abspath(path), name)


def check_output_file(path: str, name: str) -> None:
    """Like ``check_output_dir`` for a file ``path`` whose directory must already exist; a
    symlink counts as its target, and devices, FIFOs and sockets are refused
    (``files.output_target``)."""
    from megatron_c2r.files import output_target  # numpy only

    path = output_target(path, name)
    parent = os.path.dirname(path)
    if not os.path.lexists(parent):
        raise FileNotFoundError(f"{name}={path!r}: directory {parent!r} does not exist: create it")
    _check_writable(path, parent, name)


def _check_writable(given: str, directory: str, name: str) -> None:
    probe = directory
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(
            f"{name}={given!r}: {probe!r} is a file, not a directory: choose another {name}"
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PermissionError(
            f"{name}={given!r}: cannot write in {probe!r} ({exc.strerror}): choose a writable "
            "directory"
        ) from None


# --------------------------------------------------------------------------------------------
# train: the CPU main job
# --------------------------------------------------------------------------------------------
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_TRAIN_CONFIG,
                        help=f"run config YAML (default {DEFAULT_TRAIN_CONFIG}; schema: {CONFIG_DOC})")
    _add_set(parser, "c2r.max_groups=2")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="training iterations: overrides megatron.--train-iters in the YAML "
                             "(a c2r.warmup_steps that would not end within N is scaled to the "
                             "same fraction of the run, with one printed line)")
    parser.add_argument("--out", metavar="DIR", help="output directory: overrides cpu.out_dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the output directory "
                             "(pass the same --config, --set and --steps)")
    parser.add_argument("--exit-after", type=int, metavar="N",
                        help="stop after iteration N (schedule unchanged), checkpoint, exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: overrides cpu.progress")


def _run_train(args: argparse.Namespace) -> int:
    cfg, notes = load_train_job(
        args.config, args.sets, train_iters=args.steps, out_dir=args.out,
        progress=False if args.no_progress else None,
    )  # fmt: skip
    if args.exit_after is not None:
        parallel.require_positive(args.exit_after, "--exit-after")
    check_output_dir(cfg.out_dir, "--out" if args.out is not None else "cpu.out_dir")
    for note in notes:
        print(f"{PROG} train: {note}", file=sys.stderr)
    from megatron_c2r.cpu.trainer import EXIT_PREEMPTED, Preempted
    from megatron_c2r.cpu.trainer import run as train  # heavy: torch, megatron.core

    try:
        train(cfg, resume=args.resume, exit_after=args.exit_after)
    except Preempted as stopped:
        print(f"{PROG} train: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


# --------------------------------------------------------------------------------------------
# pretrain / render: a cluster config
# --------------------------------------------------------------------------------------------
def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"run config YAML (schema: {CONFIG_DOC})")
    _add_set(parser, "megatron.train-iters=100")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run")


def _run_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.sets)
    cfg.check_megatron_lm()
    _check_model_build(cfg)
    if args.dry_run:
        sys.stdout.write(render(cfg, "shell"))
        return 0
    # Light at import (stdlib); its checks import torch, its main() Megatron-LM.
    from megatron_c2r.megatron_lm import entry

    try:
        entry.ensure_requirements(cfg.launch.megatron_lm)
    except entry.MissingRequirement as exc:
        _print_error("pretrain", exc)
        return 2
    os.environ.update(cfg.environment())
    return entry.main(cfg.megatron_argv() + cfg.c2r_argv())


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"run config YAML (schema: {CONFIG_DOC})")
    _add_set(parser, "megatron.train-iters=10")
    parser.add_argument("--format", choices=FORMATS, default="shell",
                        help="shell (default), json, args, args0 (NUL-separated), env, launch "
                             "(SLURM knobs), bash (everything, for launch scripts); see "
                             f"{CONFIG_DOC}")


def _check_model_build(cfg) -> None:
    """Megatron's argument defaults and every model-build check that needs no GPU
    (``megatron_lm.build_check``), as a ConfigError blamed on the config. Imports megatron.core;
    where it is missing (a batch host) the command exits 1 and the SLURM scripts render inside
    the container instead."""
    from megatron_c2r.megatron_lm.build_check import model_build_problem

    problem = model_build_problem(cfg.program_argv()[3:])
    if problem:
        raise cfg.error(f"model build: {problem}")


def _run_render(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.sets)
    cfg.check_megatron_lm()
    _check_model_build(cfg)
    sys.stdout.write(render(cfg, args.format))
    from megatron_c2r.megatron_lm.build_check import parser_note

    note = parser_note()  # after the output: an error above is always the only line
    if note:
        print(f"{PROG} render: {note}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# plan / convert: placement
# --------------------------------------------------------------------------------------------
def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collab", required=True, metavar="PATH",
                        help="collaboration source: .npy/.pt matrix [L,E,E] or [E,E], tracker "
                             "state dict (.pt), routing dump (.pt), Megatron routing-trace "
                             f".jsonl or its directory ({PLACEMENT_DOC})")
    parser.add_argument("--ep", type=int, required=True, metavar="P",
                        help="expert-parallel size: experts are split into P groups of E/P")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="experts per token (required for matrices; checked for traces)")
    parser.add_argument("--top-t", type=int, default=None, metavar="T",
                        help="also write Top-T collaborator lists (the C2R paper's rule)")
    parser.add_argument("--num-experts", type=int, default=None, metavar="E",
                        help="number of experts (traces: default max id + 1)")
    parser.add_argument("--max-load-imbalance", type=_load_bound, default=None, metavar="X",
                        help="keep every EP rank's (and node's) expected tokens <= X x the mean "
                             "where achievable (else the smallest achievable), maximising "
                             "locality under that; 'off' (default): locality only "
                             "(docs/placement.md)")
    nodes = parser.add_mutually_exclusive_group()
    nodes.add_argument("--nodes", type=int, default=None, metavar="N",
                       help="hierarchical plan: N nodes of P/N consecutive EP ranks; experts go "
                            "to nodes first (fewest nodes per token), then to ranks inside each")
    nodes.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                       help="the same as --nodes P/G")
    parser.add_argument("--tradeoff", type=_load_bounds, default=DEFAULT_TRADEOFF,
                        metavar="X,Y,...",
                        help="also plan these bounds and print the locality/balance trade-off "
                             f"(default {','.join(map(str, DEFAULT_TRADEOFF))}; 'none' skips it)")
    parser.add_argument("--seed", type=int, default=0, help="planner seed (deterministic)")
    parser.add_argument("--restarts", type=int, default=4,
                        help="heuristic starts per layer (greedy, identity, random...)")
    parser.add_argument("--out", default="plan.json", help="plan file to write (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


DEFAULT_TRADEOFF = (1.25, 1.1, 1.05)  # bounds the plan report compares with 'off'


def _load_bound(text: str) -> Optional[float]:
    """--max-load-imbalance: 'off' or a finite number >= 1 (argparse turns errors into one line)."""
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bound: give the busiest group over the mean load, a number >= 1 "
            "(e.g. 1.1), or 'off'")
    return value


def _load_bounds(text: str) -> Tuple[Optional[float], ...]:
    if text.strip().lower() == "none":
        return ()
    return tuple(_load_bound(part) for part in text.split(","))


def _plan_nodes(args: argparse.Namespace) -> int:
    """Nodes of the hierarchical plan from --nodes / --gpus-per-node (1: flat)."""
    if args.nodes is not None:
        parallel.require_positive(args.nodes, "--nodes")
        if args.ep % args.nodes:
            raise ValueError(f"--nodes {args.nodes} must divide --ep {args.ep}: nodes hold equal "
                             "blocks of EP ranks")
        return args.nodes
    if args.gpus_per_node is not None:
        parallel.require_positive(args.gpus_per_node, "--gpus-per-node")
        if args.ep % args.gpus_per_node:
            raise ValueError(f"--gpus-per-node {args.gpus_per_node} must divide --ep {args.ep}: "
                             "nodes hold equal blocks of EP ranks")
        return args.ep // args.gpus_per_node
    return 1


def _run_plan(args: argparse.Namespace) -> int:
    parallel.require_positive(args.ep, "--ep")
    parallel.require_positive(args.restarts, "--restarts")
    for name in ("top_k", "num_experts"):
        if getattr(args, name) is not None:
            parallel.require_positive(getattr(args, name), "--" + name.replace("_", "-"))
    num_nodes = _plan_nodes(args)
    if not os.path.lexists(args.collab):
        raise FileNotFoundError(f"--collab {args.collab!r}: no such file or directory")
    check_output_file(args.out, "--out")
    # Heavy: torch and numpy (sources, planner).
    from megatron_c2r.placement.plan_file import write_plan
    from megatron_c2r.placement.plan_report import format_plan_table, format_tradeoff
    from megatron_c2r.placement.planner import PlannerConfig, plan_with_tradeoff
    from megatron_c2r.placement.sources import load_collaboration

    layers = load_collaboration(args.collab, top_k=args.top_k, num_experts=args.num_experts)
    num_experts, top_k = layers[0].num_experts, layers[0].top_k
    parallel.experts_per_rank(num_experts, args.ep, experts_name=f"{args.collab}: num_experts",
                              ep_name="--ep")
    config = PlannerConfig(ep_size=args.ep, seed=args.seed, restarts=args.restarts,
                           max_load_imbalance=args.max_load_imbalance, num_nodes=num_nodes)
    bounds = list(dict.fromkeys([None, *args.tradeoff, args.max_load_imbalance])) \
        if args.tradeoff else []
    plan, tradeoff = plan_with_tradeoff(layers, config, bounds=bounds, top_t=args.top_t,
                                        progress=not args.no_progress)
    plans = plan.layers
    print(format_plan_table(plans, exact=all(p.exact for p in plans)))
    if tradeoff:
        print(format_tradeoff(tradeoff, chosen=args.max_load_imbalance))
    write_plan(plan, args.out)
    where = f", {num_nodes} nodes x {args.ep // num_nodes} ranks" if num_nodes > 1 else ""
    print(f"wrote {args.out} ({len(plans)} layers, E={num_experts}, EP={args.ep}{where}, "
          f"k={top_k})", file=sys.stderr)
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="torch_dist checkpoint directory, or a Megatron-LM --save directory "
                             "(latest_checkpointed_iteration.txt)")
    parser.add_argument("--plan", required=True, metavar="PLAN", help="plan.json from `plan`")
    parser.add_argument("--save", required=True, metavar="OUT",
                        help="new directory for the relabelled checkpoint (same layout)")
    parser.add_argument("--drop-optimizer", action="store_true",
                        help="leave optimizer state out (needed for flat DistributedOptimizer "
                             "buffers, which mix experts)")


def _single_process_group() -> bool:
    """dist_checkpointing needs a process group: one gloo process on an OS-assigned local port.
    Returns whether we created it (and so must destroy it)."""
    import torch.distributed as dist  # heavy: torch

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def _run_convert(args: argparse.Namespace) -> int:
    # Heavy: torch (and megatron.core's dist_checkpointing once converting starts).
    from megatron_c2r.placement.checkpoint import convert_checkpoint, resolve_checkpoint
    from megatron_c2r.placement.plan_file import read_plan

    plan = read_plan(args.plan)
    resolve_checkpoint(args.load)  # fail fast on a wrong path before importing megatron
    check_output_dir(args.save, "--save")
    created = _single_process_group()
    try:
        out = convert_checkpoint(args.load, plan, args.save, drop_optimizer=args.drop_optimizer)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    moved = sum(o != i for layer in plan.layers for i, o in enumerate(layer.order))
    print(f"wrote {out}: {len(plan.layers)} MoE layers relabelled "
          f"({moved} of {len(plan.layers) * plan.num_experts} expert slots changed)",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# estimate: the cluster cost model
# --------------------------------------------------------------------------------------------
def _estimate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"run config YAML with an MoE model (schema: {CONFIG_DOC})")
    _add_set(parser, "megatron.moe-router-topk=4")
    parser.add_argument("--routing", default="uniform", metavar="SOURCE",
                        help="uniform (default: iid router scores), clustered[:C[:S]] (C planted "
                             "clusters of co-activating experts, +S on the logits), or a file: a "
                             "Megatron routing trace (.jsonl or its directory), our routing dump "
                             "or tracker state (.pt), a co-activation matrix (.npy)")
    parser.add_argument("--nodes", type=int, metavar="N",
                        help="nodes the EP group spans: EP = N x launch.gpus_per_node (default: "
                             "the config's megatron.--expert-model-parallel-size)")
    parser.add_argument("--max-nodes", type=int, default=1, metavar="M",
                        help="nodes per token under our node-anchored routing (default 1)")
    parser.add_argument("--tokens-per-gpu", type=int, metavar="T",
                        help="tokens each GPU routes per micro-batch (default: micro-batch-size "
                             "x seq-length / context-parallel-size)")
    parser.add_argument("--layer", type=int, metavar="L",
                        help="one layer of a routing file (default: the mean over its layers)")
    parser.add_argument("--seed", type=int, default=0, help="token sampling seed (deterministic)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON (atomically)")
    ttq = parser.add_argument_group(
        "time to quality (docs/time_to_quality.md)",
        "token efficiency rho from loss curves x step-time ratio tau from the model: speedup rho/tau")
    ttq.add_argument("--baseline-loss", nargs="+", metavar="F",
                     help="the baseline's loss curves, one per seed: the CPU job's history.csv, a "
                          "CSV with iteration,loss columns, or a Megatron-LM TensorBoard directory "
                          "(scalar 'lm loss')")
    ttq.add_argument("--candidate-loss", nargs="+", metavar="F",
                     help="the candidate's loss curves, as many seeds, paired in order, at least as "
                          "long as the baseline")
    ttq.add_argument("--candidate-routing", choices=("node-anchored", "megatron-node-limited", "config"),
                     default="node-anchored",
                     help="what the candidate runs route with: ours node-anchored (default) or "
                          "Megatron's node-limited routing, both M = --max-nodes, or the config's")
    ttq.add_argument("--baseline-transport", choices=TRANSPORTS, default="deepep",
                     help="the baseline's all-to-all (default deepep: flex + DeepEP-style)")
    ttq.add_argument("--candidate-transport", choices=TRANSPORTS, default="two_level",
                     help="the candidate's all-to-all (default two_level: ours)")
    ttq.add_argument("--overlap", action="store_true",
                     help="headline tau with Megatron's --overlap-moe-expert-parallel-comm (ideal); "
                          "default: without (Megatron's default); both are printed")
    ttq.add_argument("--dense-tflops", type=float, default=DENSE_TFLOPS, metavar="X",
                     help="achieved TFLOP/s of attention and dense parts (default "
                          f"{DENSE_TFLOPS:g}: Megatron-core's published H100 throughput)")
    ttq.add_argument("--a2a-share", type=float, metavar="F",
                     help="your measured baseline step's exposed all-to-all share (0-1): tau = "
                          "(1 - F) + F x modeled comm ratio, instead of the modeled step")
    ttq.add_argument("--step-time-ms", type=float, metavar="MS",
                     help="your measured baseline step time (with --a2a-share): printed as times")
    ttq.add_argument("--recommend", action="store_true",
                     help="rank every routing x transport on this cluster by modeled time to "
                          "quality (the study's loss gaps, or your curves for the candidate)")
    for f in dataclasses.fields(LinkParams):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                            metavar="X", help=f"{PARAM_HELP[f.name]} (default {f.default:g})")
    parser.epilog = f"Model, parameters and their sources, calibration: {COST_DOC}."


def _check_quality_args(args: argparse.Namespace, source) -> None:
    """Time-to-quality flags that only make sense together (one line each, exit 2)."""
    if (args.baseline_loss is None) != (args.candidate_loss is None):
        given = "--baseline-loss" if args.baseline_loss is not None else "--candidate-loss"
        missing = "--candidate-loss" if given == "--baseline-loss" else "--baseline-loss"
        raise ValueError(f"{given} needs {missing}: pass the loss curves of both sides")
    if args.step_time_ms is not None and args.a2a_share is None:
        raise ValueError("--step-time-ms needs --a2a-share: the share of that step spent in "
                         "exposed all-to-alls (e.g. 0.3)")
    if args.step_time_ms is not None and not (math.isfinite(args.step_time_ms) and args.step_time_ms > 0):
        raise ValueError(f"--step-time-ms={args.step_time_ms} must be > 0")
    if not (math.isfinite(args.dense_tflops) and args.dense_tflops > 0):
        raise ValueError(f"--dense-tflops={args.dense_tflops} must be > 0")
    if args.a2a_share is not None and not 0 <= args.a2a_share < 1:
        raise ValueError(f"--a2a-share={args.a2a_share} must be in [0, 1): the exposed all-to-all "
                         "time over the whole step time, e.g. 0.3")
    wants = args.baseline_loss is not None or args.recommend
    if wants and source.kind == "file":
        raise ValueError("--baseline-loss/--recommend compare routings on synthetic scores: drop "
                         "--routing FILE (or run estimate on it without them)")


def _run_estimate(args: argparse.Namespace) -> int:
    params = LinkParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LinkParams)})
    cfg = load_config(args.config, args.sets)
    shape, notes = shape_from_config(cfg, nodes=args.nodes, tokens_per_gpu=args.tokens_per_gpu)
    config = config_rule(cfg, shape.ep_size, shape.nodes)
    config.check(shape.num_experts, shape.topk)
    ours = node_anchored(shape.nodes, args.max_nodes)
    ours.check(shape.num_experts, shape.topk)
    source = parse_routing(args.routing)
    if args.layer is not None and (source.kind != "file" or args.layer < 0):
        raise ValueError(f"--layer {args.layer}: only a routing file has layers, numbered from 0")
    _check_quality_args(args, source)
    # numpy (loss curves); torch only below
    from megatron_c2r.cost.time_to_quality import read_loss_curve, routing_rules, step_flops, token_efficiency

    efficiency = None
    if args.baseline_loss is not None:  # every loss file is read and checked before any work
        baseline_curves = [read_loss_curve(p, "--baseline-loss file") for p in args.baseline_loss]
        candidate_curves = [read_loss_curve(p, "--candidate-loss file") for p in args.candidate_loss]
        efficiency = token_efficiency(baseline_curves, candidate_curves)
    flops = step_flops(cfg) if efficiency is not None or args.recommend else None
    if args.json is not None:
        check_output_file(args.json, "--json")
    for note in notes:
        print(f"{PROG} estimate: {note}", file=sys.stderr)
    # Heavy: torch (the counting code of the dispatchers; no Megatron).
    from megatron_c2r.cost.model import METHOD_LABELS, estimate, format_table, write_json
    from megatron_c2r.cost.quality_report import quality_report, recommend
    from megatron_c2r.cost.routing import mean_rows, sample_counts, sample_routings

    score_function = cfg.megatron_value("moe-router-score-function", "softmax")
    if flops is None:
        counts, baseline = sample_routings(source, shape, config, ours, seed=args.seed,
                                           layer_index=args.layer, score_function=score_function)  # fmt: skip
        extra = {}
    else:  # the config's and ours, plus every routing the time-to-quality comparison needs
        rules = {config.label: config, ours.label: ours}
        more = routing_rules(shape.nodes)
        rules.update({rule.label: rule for rule in more.values()})
        if args.candidate_routing == "megatron-node-limited":
            nl = RoutingRule(f"Megatron node-limited {args.max_nodes} of {shape.nodes}", shape.nodes,
                             args.max_nodes, anchored=False, limit_name="--max-nodes")  # fmt: skip
            nl.check(shape.num_experts, shape.topk)
            rules[nl.label] = nl
        by_label = sample_counts(source, shape, rules, seed=args.seed, score_function=score_function)
        counts, baseline = [{k: by_label[k] for k in (config.label, ours.label)}], config.label
        extra = dict(by_label=by_label, keyed={key: by_label[rule.label] for key, rule in more.items()})
    rows = mean_rows([estimate(c, params, baseline) for c in counts])
    layers = f", mean of {len(counts)} layers" if len(counts) > 1 else ""
    print(f"{args.config}: {shape.num_experts} experts top-{shape.topk}, hidden {shape.hidden}, "
          f"expert FFN {shape.ffn_hidden}{' (SwiGLU)' if shape.swiglu else ''}; EP "
          f"{shape.ep_size} = {shape.nodes} node(s) x {shape.gpus_per_node} GPUs; "
          f"{shape.tokens_per_gpu} tokens per GPU; routing: {source.label}{layers}")  # fmt: skip
    print(f"modeled with NVLink {params.nvlink_gbps:g} / IB {params.ib_gbps:g} GB/s per GPU, "
          f"{params.nvlink_latency_us:g} / {params.ib_latency_us:g} us per peer, GEMM "
          f"{params.gemm_tflops:g} TFLOP/s, {params.bytes_per_element:g} bytes per element "
          f"({COST_DOC})")  # fmt: skip
    print(format_table(rows))
    out = dict(config=args.config, routing=source.label, rows=rows,
               shape=dataclasses.asdict(shape), params=dataclasses.asdict(params))  # fmt: skip
    if efficiency is not None:
        candidate_label = {"node-anchored": ours.label, "config": config.label}.get(
            args.candidate_routing, f"Megatron node-limited {args.max_nodes} of {shape.nodes}")
        result = quality_report(
            efficiency, extra["by_label"][config.label], extra["by_label"][candidate_label],
            args, params, flops, shape.tokens_per_gpu,
            baseline=f"{config.label} on {METHOD_LABELS[args.baseline_transport]}",
            candidate=f"{candidate_label} on {METHOD_LABELS[args.candidate_transport]}",
        )  # fmt: skip
        out.update(result)
    if args.recommend:
        out["recommendation"] = recommend(extra["keyed"], args, params, flops, shape, efficiency)
    if args.json is not None:
        write_json(args.json, out)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
# name -> (one-line help, add arguments, run)
_Subcommand = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]
SUBCOMMANDS: Dict[str, _Subcommand] = {
    "train": ("the CPU main job: tiny real C2R MoE pretraining on gloo (no GPU needed; "
              f"{TRAIN_DOC})", _train_arguments, _run_train),
    "pretrain": ("run one process of Megatron-LM GPT pretraining with C2R from a YAML config",
                 _pretrain_arguments, _run_pretrain),
    "render": ("print the exact command line and environment a YAML config runs",
               _render_arguments, _run_render),
    "plan": ("plan a collaboration-aware expert placement (and Top-T lists) from routing "
             "statistics", _plan_arguments, _run_plan),
    "convert": ("apply a placement plan to a Megatron-LM torch_dist checkpoint (relabel "
                "experts, offline)", _convert_arguments, _run_convert),
    "estimate": ("model one MoE layer's forward+backward time on a GPU cluster: Megatron "
                 "alltoall, DeepEP-style, HybridEP, our flat and two-level dispatchers, with "
                 "the config's routing and with node-anchored routing; with loss curves (--baseline-loss, "
                 "--candidate-loss) or --recommend, time to quality", _estimate_arguments,
                 _run_estimate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Collaboration-constrained MoE routing and de-duplicating expert parallelism "
            "for Megatron-core."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_run=run)
        add_arguments(sp)
    return parser


def _print_error(command: str, exc: BaseException) -> None:
    print(f"{PROG} {command}: error: {one_line(exc)}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``megatron-c2r`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        _print_error(args.command, exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops on it cleanly)
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
