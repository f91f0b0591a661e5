"""What the cluster cost model is given: hardware parameters, the MoE layer and its EP group, the
routing rules, and where routing comes from. Pure Python (no torch), so ``megatron-c2r estimate``
reports every bad flag or config in milliseconds, before torch is imported.

``shape_from_config`` and ``config_rule`` read a validated run config (``run_config.RunConfig``)
the way Megatron would run it; the model itself (``cost.model``) never sees YAML.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_c2r import parallel

# Synthetic routing when no routing source is given: "uniform" (iid scores: every top-k set
# equally likely) or "clustered[:C[:S]]" (C planted clusters of co-activating experts, dealt
# over the expert ids at random; a token's cluster gets +S on its logits).
SYNTHETIC = ("uniform", "clustered")
DEFAULT_CLUSTERS = 16
DEFAULT_STRENGTH = 2.0


# Time to quality (cost.time_to_quality): the achieved TFLOP/s of attention and dense parts,
# Megatron-core's published H100 throughput for large models (~47% MFU, 390-400 TFLOP/s per GPU;
# the --gemm-tflops default has the same source, docs/cost_model.md), and the transports a
# configuration can name (cost.model.METHODS, spelled here so the CLI needs no torch).
DENSE_TFLOPS = 400.0
TRANSPORTS = ("alltoall", "deepep", "hybridep", "flat_dedup", "two_level")


def _param(default: float, help: str, *, zero_ok: bool = False):
    """A :class:`LinkParams` field: its default, the ``estimate`` flag's --help text and whether
    0 is allowed (a latency or metadata size may be 0; a bandwidth, throughput or element size
    may not). The default's source is in docs/cost_model.md."""
    return dataclasses.field(default=default, metadata=dict(help=help, zero_ok=zero_ok))



# What `estimate` samples per GPU at most: memory and time grow with tokens x GPUs x experts
# (200k tokens per GPU on 64 GPUs x 256 experts took 8 minutes and gigabytes).
MAX_TOKENS_PER_GPU = 32768

@dataclass(frozen=True, kw_only=True)
class LinkParams:
    """Hardware parameters (defaults: a DGX H100 cluster; sources in docs/cost_model.md).

    Bandwidths are GB/s (1e9 bytes) per GPU per direction; latencies are microseconds per peer a
    GPU exchanges rows with on that link in one all-to-all (NCCL skips zero-size peers); the GEMM
    throughput is what the expert MLPs achieve, 1e12 FLOP/s. Each field is also the ``estimate``
    flag ``--<field with dashes>``, with the help text given here (:data:`PARAM_HELP`).
    """

    nvlink_gbps: float = _param(
        370.0, "NVLink GB/s per GPU per direction (H100, effective in NCCL)"
    )
    ib_gbps: float = _param(
        48.0, "InfiniBand GB/s per GPU per direction (one CX7 NDR 400 Gb/s NIC, measured)"
    )
    nvlink_latency_us: float = _param(
        1.5, "microseconds per NVLink peer per all-to-all", zero_ok=True
    )
    ib_latency_us: float = _param(
        3.1, "microseconds per InfiniBand peer per all-to-all", zero_ok=True
    )
    gemm_tflops: float = _param(400.0, "achieved expert GEMM throughput, TFLOP/s (BF16 H100)")
    bytes_per_element: float = _param(
        2.0, "bytes per hidden-state element on the wire (2 = bf16, ~1.03 = fp8 + scales)"
    )
    meta_bytes: float = _param(
        4.0, "bytes per metadata column (a prob or an expert id)", zero_ok=True
    )
    hybridep_dispatch_efficiency: float = _param(
        0.81, "HybridEP dispatch: achieved fraction of the model's overlapped two-hop bound "
        "(set from its EP16 H100 point, docs/cost_model.md)"
    )
    hybridep_combine_efficiency: float = _param(
        0.717, "HybridEP combine: achieved fraction of the model's overlapped two-hop bound "
        "(set from its EP16 H100 point, docs/cost_model.md)"
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, zero_ok = getattr(self, f.name), f.metadata["zero_ok"]
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise ValueError(
                    f"--{f.name.replace('_', '-')}={value} must be {'>= 0' if zero_ok else '> 0'}"
                )


# --help of each LinkParams flag, from the fields.
PARAM_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(LinkParams)}


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """One MoE layer and its EP group: E experts top-K, hidden H, expert FFN hidden F (SwiGLU:
    two input projections), P = ``ep_size`` GPUs of ``gpus_per_node`` per node, T tokens per GPU
    per micro-batch. Raises ValueError naming the field for an impossible layout."""

    num_experts: int
    topk: int
    hidden: int
    ffn_hidden: int
    swiglu: bool = True
    ep_size: int
    gpus_per_node: int
    tokens_per_gpu: int

    def __post_init__(self):
        for name in ("hidden", "ffn_hidden", "gpus_per_node", "tokens_per_gpu"):
            parallel.require_positive(getattr(self, name), name)
        parallel.experts_per_rank(self.num_experts, self.ep_size, ep_name="ep_size")
        parallel.check_topk(self.topk, self.num_experts, topk_name="topk")
        if self.ep_size % self.gpus_per_node:
            raise ValueError(
                f"ep_size={self.ep_size} must be a multiple of gpus_per_node={self.gpus_per_node} "
                "(an EP group spans whole nodes; below one node give gpus_per_node=ep_size)"
            )

    @property
    def nodes(self) -> int:
        """D, nodes the EP group spans."""
        return self.ep_size // self.gpus_per_node

    @property
    def experts_per_gpu(self) -> int:
        """L = E / P (``parallel.experts_per_rank``, the rule ``__post_init__`` checked)."""
        return parallel.experts_per_rank(self.num_experts, self.ep_size, ep_name="ep_size")

    @property
    def flops_per_row(self) -> float:
        """Expert GEMM FLOPs of one (token, expert) row, forward + backward (= 3x forward):
        forward 2*H*F per projection, three projections with SwiGLU (gate, up, down), else two."""
        projections = 3 if self.swiglu else 2
        return 3.0 * 2.0 * self.hidden * self.ffn_hidden * projections


@dataclass(frozen=True)
class RoutingRule:
    """How tokens pick experts in the model (the router's own rules, ``cost.routing``):

    * plain top-k: ``num_groups`` None;
    * group rule: at most ``max_groups`` of ``num_groups`` contiguous expert groups, top-k
      inside, groups chosen ``anchored`` (the top-1 expert's group first, then the best others
      by group score: our rule) or by group score alone (Megatron's group-limited rule);
    * node rule (``num_nodes`` set): the ``num_groups`` groups are the EP ranks, split into
      ``num_nodes`` contiguous nodes; at most ``max_groups`` nodes per token (anchored or by
      score), optionally at most ``max_ranks_per_node`` ranks inside each (the router's
      node-limited rule, ``routing.functional.node_topk``);
    * balanced (MoGE, ``c2r.mode: group_balanced``): exactly k/G experts from every one of the
      ``num_groups`` contiguous groups (``routing.moge.group_balanced_topk``; G divides k).
    """

    label: str
    num_groups: Optional[int] = None
    max_groups: int = 1
    anchored: bool = True
    limit_name: str = "max_groups"  # the flag or YAML path that set max_groups (for messages)
    num_nodes: Optional[int] = None
    max_ranks_per_node: Optional[int] = None
    balanced: bool = False
    # Budgeted relaxation (``c2r.mean_budget``): the group / node rule relaxed to ``relax_to``
    # blocks (None: all) for the tokens that lose most, mean blocks per token <= the budget.
    mean_budget: Optional[float] = None
    relax_to: Optional[int] = None
    relax_by: str = "score_lost"

    def check(self, num_experts: int, topk: int) -> None:
        """ValueError naming ``limit_name`` unless the rule can route ``topk`` of
        ``num_experts`` experts."""
        if self.num_groups is None:
            return
        if self.balanced and topk % self.num_groups:
            raise ValueError(f"{self.limit_name}={self.num_groups} must divide top-{topk} "
                             f"({self.label} takes k/G experts from every group)")  # fmt: skip
        per_group = parallel.experts_per_rank(
            num_experts, self.num_groups, experts_name="megatron.--num-experts",
            ep_name=f"the {self.num_groups} groups of {self.label}",
        )  # fmt: skip
        blocks, per_block = self.num_groups, per_group
        if self.num_nodes is not None:
            ranks = parallel.experts_per_rank(self.num_groups, self.num_nodes,
                                              experts_name="EP", ep_name="nodes")  # fmt: skip
            blocks = self.num_nodes
            per_block = per_group * min(ranks, self.max_ranks_per_node or ranks)
        if not 1 <= self.max_groups <= blocks:
            raise ValueError(
                f"{self.limit_name}={self.max_groups} must be in [1, {blocks}] ({self.label})"
            )
        if self.max_groups * per_block < topk:
            raise ValueError(
                f"{self.limit_name}={self.max_groups}: {self.max_groups} block(s) of {per_block} "
                f"experts cannot hold top-{topk} ({self.label}): raise it"
            )


def node_anchored(nodes: int, max_nodes: int, ep_size: Optional[int] = None,
                  mean_budget: Optional[float] = None, relax_to: Optional[int] = None) -> RoutingRule:
    """Our node-anchored rule: the top-1 expert's node plus the best M-1 other nodes by group
    score, top-k inside (``node_topk``; equal to the group-anchored rule with groups = nodes).
    ``ep_size``: the EP ranks the nodes are made of (default: one group per node).
    ``mean_budget``: relaxed to all nodes for the tokens that lose most, at most that many nodes
    per token on average (the budgeted rule; ``relax_to``: relaxed to that many nodes)."""
    label = f"node-anchored M={max_nodes}" + (f", budget {mean_budget:g}" if mean_budget else "")
    label += f" relaxed to {relax_to}" if relax_to else ""
    return RoutingRule(label, ep_size or nodes, max_nodes, anchored=True, limit_name="--max-nodes",
                       num_nodes=nodes, mean_budget=mean_budget, relax_to=relax_to)  # fmt: skip


def config_rule(cfg, ep_size: int, nodes: int) -> RoutingRule:
    """The routing rule a run config trains with (``cfg``: a validated ``RunConfig``), for an EP
    group of ``ep_size`` GPUs on ``nodes`` nodes. Raises ValueError for a rule the model cannot
    synthesize (the C2R top-T rule needs the run's learned lists: pass a routing source)."""
    c2r, router = cfg.c2r, cfg.c2r.router
    if c2r.enabled and router.locality_bias_target is not None:
        raise ValueError(
            f"c2r.locality_bias_target={router.locality_bias_target}: the soft locality bias's "
            "rows depend on the offset training steers, which the model cannot synthesize: pass "
            "--routing with a routing trace or dump of that run"
        )
    budget = dict(mean_budget=router.mean_budget, relax_to=router.relax_to, relax_by=router.relax_by)
    relaxed = "" if router.mean_budget is None else f", budget {router.mean_budget:g} per token"
    if c2r.enabled and router.mode == "group":
        groups = router.num_groups or ep_size
        how = "" if router.group_selection == "anchored" else ", group score"
        return RoutingRule(f"C2R group {router.max_groups} of {groups}{how}{relaxed}", groups,
                           router.max_groups, anchored=router.group_selection == "anchored",
                           limit_name="c2r.max_groups", **budget)  # fmt: skip
    if c2r.enabled and router.mode == "node":
        # The nodes are the EP group's (a --nodes override moves them; the router derives its
        # own from the same layout). The node bias (group_bias_rate) is a balance term the
        # model leaves out: uniform scores are balanced already.
        max_nodes, ranks = router.max_nodes or 1, router.max_ranks_per_node
        label = f"C2R node {max_nodes} of {nodes}" + (f", {ranks} ranks each" if ranks else "") + relaxed
        return RoutingRule(label, ep_size, max_nodes,
                           anchored=router.group_selection == "anchored",
                           limit_name="c2r.max_nodes", num_nodes=nodes, max_ranks_per_node=ranks,
                           **budget)  # fmt: skip
    if c2r.enabled and router.mode == "group_balanced":
        groups = router.num_groups or ep_size
        return RoutingRule(f"MoGE k/{groups} from each of {groups} groups", groups, groups,
                           limit_name="c2r.num_groups", balanced=True)  # fmt: skip
    if c2r.enabled and router.mode == "c2r":
        raise ValueError(
            "c2r.mode='c2r' routes from learned top-T lists the model cannot synthesize: pass "
            "--routing with a routing trace or dump of that run"
        )
    groups, kept = cfg.megatron_value("moe-router-num-groups"), cfg.megatron_value("moe-router-group-topk")
    if groups and kept:
        return RoutingRule(f"Megatron group-limited {kept} of {groups}", groups, kept,
                           anchored=False, limit_name="megatron.--moe-router-group-topk")  # fmt: skip
    return RoutingRule("top-k")


def shape_from_config(
    cfg, *, nodes: Optional[int] = None, tokens_per_gpu: Optional[int] = None
) -> Tuple[MoEShape, List[str]]:
    """``(shape, notes)``: the MoE layer and EP group of a validated run config.

    EP group: ``--expert-model-parallel-size`` GPUs, ``launch.gpus_per_node`` per node (an EP
    group smaller than a node sits inside one); ``nodes`` (``--nodes N``) instead makes the EP
    group span N whole nodes (EP = N x gpus_per_node), said in ``notes``. Tokens per GPU:
    ``--micro-batch-size x --seq-length / --context-parallel-size`` unless given. Raises
    ValueError naming the YAML path or flag."""
    mega = cfg.megatron_value
    num_experts = mega("num-experts")
    if num_experts is None:
        raise ValueError(f"{cfg.source}: megatron.--num-experts is not set: estimate models an "
                         "MoE layer; use an MoE config")  # fmt: skip
    hidden = mega("hidden-size")
    if not isinstance(hidden, int):
        raise ValueError(f"{cfg.source}: megatron.--hidden-size={hidden!r} must be an integer")
    ffn = mega("moe-ffn-hidden-size") or mega("ffn-hidden-size") or 4 * hidden
    gpus = cfg.launch.gpus_per_node
    notes = []
    low_dim = getattr(cfg.c2r, "dispatch_dim", None) if cfg.c2r.enabled else None
    if low_dim:  # BigMac: tokens are projected H -> d before dispatch, experts run at d
        hidden, ffn = low_dim, getattr(cfg.c2r, "dispatch_ffn_hidden_size", None) or ffn
        notes.append(f"c2r.dispatch_dim={low_dim}: rows and experts modeled at d={low_dim} "
                     f"(expert FFN {ffn}) for every method; the H <-> d projections are not "
                     "counted")  # fmt: skip
    if nodes is not None:
        parallel.require_positive(nodes, "--nodes")
        ep = nodes * gpus
        parallel.experts_per_rank(num_experts, ep, experts_name="megatron.--num-experts",
                                  ep_name=f"EP (--nodes {nodes} x launch.gpus_per_node {gpus})")  # fmt: skip
        notes.append(f"--nodes {nodes}: the EP group spans {nodes} node(s) of {gpus} GPUs "
                     f"(EP {ep}; the config has {mega('expert-model-parallel-size', 1)})")  # fmt: skip
    else:
        ep = mega("expert-model-parallel-size", 1)
        if ep > gpus and ep % gpus:
            raise ValueError(
                f"megatron.--expert-model-parallel-size={ep} spans nodes of launch.gpus_per_node="
                f"{gpus} unevenly: the model needs whole nodes; pass --nodes N"
            )
        gpus = min(gpus, ep)
    if tokens_per_gpu is None:
        micro, seq = mega("micro-batch-size"), mega("seq-length")
        if not (isinstance(micro, int) and isinstance(seq, int)):
            raise ValueError(f"{cfg.source}: megatron.--micro-batch-size and --seq-length are "
                             "needed for the tokens per GPU: set them or pass --tokens-per-gpu")  # fmt: skip
        tokens_per_gpu = micro * seq // mega("context-parallel-size", 1)
    else:
        parallel.require_positive(tokens_per_gpu, "--tokens-per-gpu")
    if tokens_per_gpu > MAX_TOKENS_PER_GPU:
        raise ValueError(
            f"--tokens-per-gpu={tokens_per_gpu} (or micro-batch x seq-length): the model routes "
            f"every token of every GPU, so at most {MAX_TOKENS_PER_GPU} (row counts per token "
            f"are stable from a few thousand): pass --tokens-per-gpu {MAX_TOKENS_PER_GPU} or less")
    shape = MoEShape(
        num_experts=num_experts, topk=mega("moe-router-topk", 2), hidden=hidden, ffn_hidden=ffn,
        swiglu=bool(mega("swiglu", False)), ep_size=ep, gpus_per_node=gpus,
        tokens_per_gpu=tokens_per_gpu,
    )  # fmt: skip
    return shape, notes


@dataclass(frozen=True)
class RoutingSource:
    """Where tokens' routing comes from: ``kind`` 'uniform', 'clustered' (``clusters``,
    ``strength``) or 'file' (``path``: a Megatron routing trace (.jsonl or its directory), our
    routing dump or tracker/model state dict (.pt), or a co-activation matrix (.npy/.pt))."""

    kind: str
    path: Optional[str] = None
    clusters: int = DEFAULT_CLUSTERS
    strength: float = DEFAULT_STRENGTH

    @property
    def label(self) -> str:
        if self.kind == "file":
            return os.path.basename(os.path.normpath(self.path))
        if self.kind == "clustered":
            return f"clustered {self.clusters}x{self.strength:g}"
        return "uniform"


def parse_routing(spec: str) -> RoutingSource:
    """``--routing`` text -> RoutingSource: 'uniform', 'clustered[:C[:S]]' or a path that
    exists. Raises ValueError / FileNotFoundError naming ``--routing``."""
    name, _, rest = spec.partition(":")
    if name in SYNTHETIC and (name == "clustered" or not rest):
        if name == "uniform":
            return RoutingSource("uniform")
        parts = rest.split(":") if rest else []
        try:
            clusters = int(parts[0]) if parts and parts[0] else DEFAULT_CLUSTERS
            strength = float(parts[1]) if len(parts) > 1 else DEFAULT_STRENGTH
        except ValueError:
            raise ValueError(f"--routing {spec!r}: expected clustered[:C[:S]] with an integer C "
                             "and a number S, e.g. clustered:16:2.0") from None  # fmt: skip
        if len(parts) > 2 or clusters < 1 or not math.isfinite(strength) or strength < 0:
            raise ValueError(f"--routing {spec!r}: expected clustered[:C[:S]] with C >= 1 and "
                             "S >= 0, e.g. clustered:16:2.0")  # fmt: skip
        return RoutingSource("clustered", clusters=clusters, strength=strength)
    if not os.path.lexists(spec):
        raise FileNotFoundError(
            f"--routing {spec!r}: no such file or directory (or give uniform, clustered[:C[:S]])"
        )
    return RoutingSource("file", path=spec)
