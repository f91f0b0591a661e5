"""``C2RRouterConfig``: the router's options, validated once (pure: no Megatron imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_c2r.errors import at_least, check_lower_bounds
from megatron_c2r.parallel import experts_per_rank

MODES = ("topk", "c2r", "group", "node", "group_balanced")
GROUP_SELECTIONS = ("anchored", "group_score")
AUX_LOSS_MAPS = ("auto", "constrained", "preferred")
# Options that only the node rule reads (set with another mode: a one-line error, not ignored).
NODE_ONLY_FIELDS = ("max_nodes", "max_ranks_per_node")


@dataclass(frozen=True, kw_only=True)
class C2RRouterConfig:
    """Collaboration-constrained routing options (one instance per model; all MoE layers share it).

    mode: 'group' (default, the flagship) keeps each token inside at most ``max_groups`` groups,
        the top-1 expert's group first; 'node' does the same with nodes as the groups (at most
        ``max_nodes`` nodes, optionally at most ``max_ranks_per_node`` ranks in each); 'c2r' is
        the paper's rule (top-1 free, the other k-1 from the top-1 expert's top-T
        collaborators); 'topk' is Megatron's TopKRouter, bit for bit, plus the collaboration
        tracker and optional penalty; 'group_balanced' is MoGE (Pangu Pro MoE): exactly k/G
        experts from every one of the G groups (G must divide k; ``routing/moge.py``), so every
        group gets the same load by construction and every token visits every group.
    top_t: length of the collaborator ("top-T") lists (c2r). top_t = E-1 is plain top-k.
    num_groups: G, number of groups (group and node modes, penalty, statistics). None -> the EP
        size, so one group is one EP rank's expert block (after any placement relabelling).
    max_groups: M, groups a token may use (group mode). 1 -> every token is sent to one rank.
    group_selection: how groups (group mode) or nodes (node mode) are chosen: 'anchored'
        (top-1 expert's group + best other groups; lower loss than Megatron's rule at equal
        ranks per token, see docs/quality.md) or 'group_score' (the best M by group score:
        Megatron's group-limited rule, node-limited in node mode).
    expert_to_group: explicit balanced partition (length E, group id per expert). None -> the
        contiguous blocks of E/G ids, i.e. the EP ranks' expert sets.
    num_nodes / gpus_per_node: the node layout, one of them (node mode; ``gpus_per_node`` is
        also what the two-level dispatcher simulates nodes with). Nodes hold contiguous blocks
        of groups (EP ranks, hence of expert ids): node of group g = g // (G / num_nodes). On a
        cluster: num_nodes = EP size / GPUs per node, or give gpus_per_node from the launch
        config and it is derived (an EP group inside one node is 1 node). In the other modes
        ``num_nodes`` only adds node statistics (``nodes_per_token``,
        ``node_load_max_over_mean``; e.g. to measure top-k or Megatron's node-limited routing
        on the same node blocks); ``gpus_per_node`` there is the dispatcher's alone.
    max_nodes: nodes a token may use (node mode; default 1).
    max_ranks_per_node: optional R, ranks (groups) a token may use inside each chosen node
        (node mode; None = no rank limit): the anchored group rule nested in each node.
    penalty_coeff: collaboration penalty coefficient (0 = off). See routing/penalty.py.
    device_balance_coeff / comm_balance_coeff: DeepSeek-V2's device- and communication-level
        balance losses over the rule's balance groups (EP ranks; nodes in node mode), attached
        and logged like Megatron's aux loss (0 = off; the paper uses 0.05 and 0.02). See
        ``routing/balance.py``.
    group_bias_rate: aux-loss-free balance of the group choice (group and node modes; 0 = off):
        a per-group offset on the group (node) score, moved by +-rate toward balance after each
        iteration from the groups' token loads (``C2RRouter.update_group_bias_``, run by
        ``step_routers``). In units of the selection scores (logits for softmax routers).
    warmup_steps: plain top-k for this many training steps while the tracker collects
        collaboration; then top-T lists are derived and the constraint turns on. Pretraining has
        no lists at step 0. 0 -> constrained from the start (c2r then needs lists from a file).
    refresh_interval: every R steps after warm-up, re-derive the top-T lists (c2r) or, in the
        CPU trainer, re-plan the placement (group) from what plain top-k would have picked over
        those R steps. 0 = frozen after warm-up, as in the paper.
    track_collaboration: count co-activation on every training forward (needed for warm-up,
        refresh and placement planning). Under an active constraint the tracker counts what
        plain top-k would have picked (the constrained map would only confirm the current
        groups), which costs one extra top-k per counted forward.
    preference_sample_interval: under an active constraint, count plain top-k's preference on
        every n-th training iteration only (1 = every iteration). Warm-up counts every step.
    mean_budget: budgeted relaxation (group and node modes, anchored): every token gets the
        anchored rule with ``max_groups`` / ``max_nodes`` blocks, and the tokens that lose most
        under it (``relax_by``) are relaxed to ``relax_to`` blocks while the micro-batch's mean
        blocks (groups, nodes) per token stays <= this budget (``routing/rules/budgeted.py``).
        None = off. In [max_groups / max_nodes, relax_to].
    relax_to: blocks a relaxed token may use (default: all, i.e. plain top-k).
    relax_by: which tokens relax first: 'score_lost' (default: routing score the limit costs
        the token), 'best_outside' (best excluded expert over the worst kept one), 'entropy'.
    budget_ramp_steps: anneal the budget from ``relax_to`` to ``mean_budget`` over this many
        iterations after the warm-up (0 = the budget from the start).
    locality_bias_target: soft locality bias (group and node modes, anchored): select on the
        scores plus a steered offset on the anchored ``max_groups`` / ``max_nodes`` blocks,
        the offset moved after every iteration toward this mean blocks per token
        (``routing/rules/soft.py``). None = off.
    locality_bias_rate: the offset's step per iteration, in units of the selection scores.
    aux_loss_map: which routing map Megatron's aux losses (aux_loss, seq_aux_loss,
        global_aux_loss) count under our rules' constraint: 'constrained' (the load the experts
        actually get), 'preferred' (plain top-k of the full scores, as Megatron counts its own
        group-limited routing; node mode with ``group_selection='group_score'`` is then
        Megatron's node-limited router, aux loss included), or 'auto' (default): 'preferred' in
        node mode, where it was measured (docs/quality.md, "1,200 steps": the constrained map's
        gap to top-k grows with training, the preferred map's does not), 'constrained' in the
        other modes. Mode 'topk' is Megatron's router and counts Megatron's way whatever this
        says. ``aux_loss_counts_preferred`` is the resolved choice.
    check_finite_logits: raise on NaN/Inf router logits before they reach a collective. In a
        stock Megatron MoELayer this costs one small device->host sync per layer; our
        C2RMoELayer defers it into the dispatcher's count exchange (no extra sync; see
        ``C2RRouter.defer_finite_check``).
    """

    mode: str = "group"
    top_t: Optional[int] = None
    num_groups: Optional[int] = None
    max_groups: int = 1
    group_selection: str = "anchored"
    expert_to_group: Optional[Tuple[int, ...]] = None
    num_nodes: Optional[int] = at_least(1, default=None)
    gpus_per_node: Optional[int] = at_least(1, default=None)
    max_nodes: Optional[int] = at_least(1, default=None)
    max_ranks_per_node: Optional[int] = at_least(1, default=None)
    penalty_coeff: float = at_least(0, default=0.0, note=" (0 = off)")
    device_balance_coeff: float = at_least(0, default=0.0, note=" (0 = off)")
    comm_balance_coeff: float = at_least(0, default=0.0, note=" (0 = off)")
    group_bias_rate: float = at_least(0, default=0.0, note=" (0 = off)")
    warmup_steps: int = at_least(0, default=0)
    refresh_interval: int = at_least(0, default=0)
    track_collaboration: bool = True
    preference_sample_interval: int = at_least(1, default=1, note=" (1 = count every iteration)")
    mean_budget: Optional[float] = at_least(1, default=None)
    relax_to: Optional[int] = at_least(2, default=None)
    relax_by: str = "score_lost"
    budget_ramp_steps: int = at_least(0, default=0)
    locality_bias_target: Optional[float] = at_least(1, default=None)
    locality_bias_rate: float = at_least(0, default=0.01)
    aux_loss_map: str = "auto"
    check_finite_logits: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"c2r.mode={self.mode!r} must be one of {', '.join(MODES)}")
        if self.group_selection not in GROUP_SELECTIONS:
            raise ValueError(
                f"c2r.group_selection={self.group_selection!r} must be one of "
                f"{', '.join(GROUP_SELECTIONS)}"
            )
        if self.aux_loss_map not in AUX_LOSS_MAPS:
            raise ValueError(
                f"c2r.aux_loss_map={self.aux_loss_map!r} must be one of {', '.join(AUX_LOSS_MAPS)}"
            )
        check_lower_bounds(self, "c2r.")  # the lower bounds the fields declare (at_least)
        if self.mode != "node":
            for name in NODE_ONLY_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"c2r.{name}={getattr(self, name)} applies to c2r.mode='node' only: set "
                        f"c2r.mode: node or remove c2r.{name} (mode is {self.mode!r})"
                    )
        if self.group_bias_rate and self.mode not in ("group", "node"):
            raise ValueError(
                f"c2r.group_bias_rate={self.group_bias_rate} biases the group choice of modes "
                f"'group' and 'node' (mode is {self.mode!r}): set it to 0 or change c2r.mode"
            )
        if self.mode == "group_balanced" and self.penalty_coeff:
            raise ValueError(
                f"c2r.penalty_coeff={self.penalty_coeff} pulls tokens into their top-1 expert's "
                "group but c2r.mode='group_balanced' uses every group: set c2r.penalty_coeff: 0"
            )
        self._check_relaxation()
        if self.mode == "c2r" and self.top_t is None:
            raise ValueError("c2r.top_t is required for mode='c2r' (e.g. top_t: 5 for E=8, k=2)")
        if self.expert_to_group is not None:
            object.__setattr__(self, "expert_to_group", tuple(int(g) for g in self.expert_to_group))

    @property
    def aux_loss_counts_preferred(self) -> bool:
        """Whether the aux losses count plain top-k's map (``aux_loss_map`` resolved: 'auto' is
        'preferred' in node mode, 'constrained' elsewhere)."""
        return self.aux_loss_map == "preferred" or (self.aux_loss_map == "auto" and self.mode == "node")

    def _check_relaxation(self) -> None:
        """The budgeted and soft rules' fields: with the anchored group / node rule only, one of
        the two, and their sub-options only with them. (Ranges need the layout: the rules check
        them when built.)"""
        budget, soft = self.mean_budget is not None, self.locality_bias_target is not None
        for name, value, default in (("relax_to", self.relax_to, None), ("relax_by", self.relax_by, "score_lost"),
                                     ("budget_ramp_steps", self.budget_ramp_steps, 0)):  # fmt: skip
            if value != default and not budget:
                raise ValueError(f"c2r.{name}={value!r} applies to the budgeted rule only: set "
                                 f"c2r.mean_budget or remove c2r.{name}")  # fmt: skip
        if not (budget or soft):
            return
        field = "mean_budget" if budget else "locality_bias_target"
        value = getattr(self, field)
        if budget and soft:
            raise ValueError(f"c2r.mean_budget={self.mean_budget} and c2r.locality_bias_target="
                             f"{self.locality_bias_target} are two rules: set one of them")  # fmt: skip
        if self.mode not in ("group", "node") or self.group_selection != "anchored":
            raise ValueError(
                f"c2r.{field}={value} relaxes the anchored group / node rule (mode is "
                f"{self.mode!r}, group_selection {self.group_selection!r}): set c2r.mode: node "
                "(or group) with c2r.group_selection: anchored"
            )
        if soft and self.locality_bias_rate <= 0:
            raise ValueError(f"c2r.locality_bias_rate={self.locality_bias_rate} must be > 0 with "
                             "c2r.locality_bias_target set")  # fmt: skip

    def resolve(self, *, num_experts: int, topk: int, ep_size: int) -> "C2RRouterConfig":
        """Fill defaults that depend on the model (num_groups <- EP size) and validate against it.
        Errors name the field, the values and the fix."""
        if not 1 <= topk <= num_experts:  # first: the group checks below assume it
            raise ValueError(
                f"moe_router_topk={topk} must be in [1, num_moe_experts={num_experts}]: lower "
                "moe_router_topk or raise num_moe_experts"
            )
        num_groups = self.num_groups
        if num_groups is None and self.expert_to_group:
            num_groups = len(set(self.expert_to_group))
        if num_groups is None:  # one group per EP rank: the EP rule
            experts_per_rank(num_experts, ep_size, experts_name="num_moe_experts")
            num_groups = ep_size
        # Groups split the experts evenly: the EP rule, with the group field named.
        experts_per_rank(
            num_experts, num_groups, experts_name="num_moe_experts", ep_name="c2r.num_groups"
        )
        if self.mode == "c2r" and not topk - 1 <= self.top_t <= num_experts - 1:
            raise ValueError(
                f"c2r.top_t={self.top_t} must satisfy moe_router_topk-1={topk - 1} <= top_t <= "
                f"num_moe_experts-1={num_experts - 1}"
            )
        if self.mode == "group":
            if not 1 <= self.max_groups <= num_groups:
                raise ValueError(
                    f"c2r.max_groups={self.max_groups} must be in [1, num_groups={num_groups}]"
                )
            if topk > self.max_groups * (num_experts // num_groups):
                raise ValueError(
                    f"moe_router_topk={topk} exceeds c2r.max_groups={self.max_groups} x "
                    f"{num_experts // num_groups} experts per group: raise c2r.max_groups"
                )
        if self.mode == "group_balanced":
            check_group_balanced(topk, num_groups)
        if self.expert_to_group is not None and len(self.expert_to_group) != num_experts:
            raise ValueError(
                f"c2r.expert_to_group has {len(self.expert_to_group)} entries, expected "
                f"num_moe_experts={num_experts}"
            )
        if self.mode == "node":
            return self._resolve_nodes(num_experts, topk, num_groups)
        if self.num_nodes is not None:  # other modes: the node layout of the statistics only
            nodes_in_groups(num_groups, self.num_nodes, None)
        return dataclasses.replace(self, num_groups=num_groups)

    def _resolve_nodes(self, num_experts: int, topk: int, num_groups: int) -> "C2RRouterConfig":
        """Node mode: fill num_nodes (from gpus_per_node) and max_nodes (1), check the limits."""
        num_nodes = nodes_in_groups(num_groups, self.num_nodes, self.gpus_per_node)
        max_nodes = self.max_nodes if self.max_nodes is not None else 1
        if max_nodes > num_nodes:
            raise ValueError(f"c2r.max_nodes={max_nodes} must be in [1, num_nodes={num_nodes}]")
        ranks_per_node = num_groups // num_nodes
        max_ranks = self.max_ranks_per_node
        if max_ranks is not None and max_ranks > ranks_per_node:
            raise ValueError(
                f"c2r.max_ranks_per_node={max_ranks} must be in [1, {ranks_per_node}] (num_groups="
                f"{num_groups} / num_nodes={num_nodes} ranks per node)"
            )
        ranks = max_ranks if max_ranks is not None else ranks_per_node
        per_rank = num_experts // num_groups
        if topk > max_nodes * ranks * per_rank:
            raise ValueError(
                f"moe_router_topk={topk} exceeds c2r.max_nodes={max_nodes} x {ranks} ranks x "
                f"{per_rank} experts per rank: raise c2r.max_nodes (or c2r.max_ranks_per_node)"
            )
        return dataclasses.replace(
            self, num_groups=num_groups, num_nodes=num_nodes, max_nodes=max_nodes
        )


def check_group_balanced(topk: int, num_groups: int) -> None:
    """MoGE's condition: every token takes k/G experts from each of G groups, so G | k."""
    if num_groups < 1 or topk % num_groups:
        raise ValueError(
            f"c2r.mode='group_balanced' takes moe_router_topk / num_groups experts from every "
            f"group, but moe_router_topk={topk} is not a multiple of c2r.num_groups={num_groups}: "
            "set c2r.num_groups to a divisor of moe_router_topk (or change moe_router_topk)"
        )


def nodes_in_groups(num_groups: int, num_nodes: Optional[int], gpus_per_node: Optional[int]) -> int:
    """Nodes that ``num_groups`` groups (EP ranks) span: ``num_nodes``, or derived from
    ``gpus_per_node`` (EP ranks per node; an EP group inside one node spans 1 node). Nodes hold
    equal, contiguous blocks of groups; anything else is a one-line ValueError."""
    if num_nodes is None and gpus_per_node is None:
        raise ValueError(
            "c2r.mode='node' needs c2r.num_nodes or c2r.gpus_per_node (num_nodes = EP size / "
            "GPUs per node): set one, e.g. c2r.gpus_per_node: 8"
        )
    derived = None
    if gpus_per_node is not None:
        if num_groups % gpus_per_node == 0:
            derived = num_groups // gpus_per_node
        elif gpus_per_node % num_groups == 0:
            derived = 1
        else:
            raise ValueError(
                f"c2r.gpus_per_node={gpus_per_node} splits num_groups={num_groups} (the EP size) "
                "into unequal nodes: use an EP size that is a multiple or a divisor of it"
            )
    if num_nodes is not None:
        if num_groups % num_nodes:
            raise ValueError(
                f"c2r.num_nodes={num_nodes} must divide num_groups={num_groups} (nodes hold "
                f"equal blocks of EP ranks): pick a divisor of {num_groups}"
            )
        if derived is not None and derived != num_nodes:
            raise ValueError(
                f"c2r.num_nodes={num_nodes} contradicts c2r.gpus_per_node={gpus_per_node} with "
                f"num_groups={num_groups} ({derived} nodes): set only one of them"
            )
        return num_nodes
    return derived
