"""``C2RRouter``: Megatron-core's ``TopKRouter`` with collaboration-constrained routing.

Naming contract (Megatron's): logits -> scores -> probs, routing_map. Ours, once: collaboration
(co-activation counts), top-T list, group, placement. Shape suffixes: the legend in
``megatron_c2r/routing/__init__.py`` (S sequence, B micro-batch, T tokens, E experts, ...).

The routing math lives in ``megatron_c2r.routing`` (pure functions and one rule object per mode,
``routing.rules``); this class adapts it to Megatron and never branches on the mode string:
    * ``gating``: Megatron's own on CUDA (TE's bf16-in / fp32-out GEMM); a device-agnostic copy
      elsewhere (the stock one moves CPU weights to CUDA). The choice is ``compat``'s.
    * unconstrained (mode 'topk', and every mode during warm-up) delegates to
      ``TopKRouter.routing`` -> identical probs/routing_map, bit for bit.
    * constrained rules replace only the expert *selection* (``rule.select``); probs are computed
      from the chosen experts exactly as Megatron computes them, then capacity dropping, the aux
      losses (on the constrained routing map) and the expert-bias counts run as in ``TopKRouter``.
    * the collaboration tracker, the penalty (``rule.penalty``), the group-level balance losses
      and group bias (``routing.balance`` over ``rule.balance``, attached in
      ``moe/router_balance.py``), warm-up, list refresh and the statistics (``rule.violated_T``)
      sit around that. Construction against ``TopKRouter``: ``moe/router_setup.py``.

Select it through the layer spec: ``MoESubmodules(router=functools.partial(C2RRouter,
c2r_config=C2RRouterConfig(...)))``. Call ``step_routers(model, iteration)`` once per training
iteration on every rank (it is collective when a warm-up ends or lists are refreshed, and every
iteration with ``c2r.group_bias_rate`` > 0, when it updates the group biases).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from megatron_c2r import compat
from megatron_c2r.collaboration import CollaborationTracker
from megatron_c2r.moe.router_balance import (
    all_reduce_sum_,
    attach_collaboration_penalty,
    attach_group_balance_losses,
    update_group_biases,
)
from megatron_c2r.moe.router_setup import check_megatron_features, init_topk_router
from megatron_c2r.placement.permutation import ROUTER_STATE, check_order, permute_module_state_
from megatron_c2r.routing.balance import group_loads, updated_group_bias
from megatron_c2r.routing.config import C2RRouterConfig
from megatron_c2r.routing.functional import (
    contiguous_groups,
    gating_linear,
    groups_per_token,
    probs_from_selection,
    selection_scores,
    validate_top_t_lists,
)
from megatron_c2r.routing.penalty import full_scores
from megatron_c2r.routing.rules import RoutingRule, RoutingTables, rule_for_config


class C2RRouter(TopKRouter):
    """Top-k router with the C2R rule, the group-aligned rule, a collaboration penalty and a
    co-activation tracker. See the module docstring and ``C2RRouterConfig``.

    Persistent state (in ``state_dict``, so ``--load`` resumes with identical routing):
        tracker.counts/pending/...   co-activation counts (CollaborationTracker)
        top_t_lists  int64 [E, L]    collaborator lists (c2r mode; L = 0 otherwise)
        expert_to_group int64 [E]    the group partition (group mode / penalty / statistics)
        constraint_active bool []    False during warm-up
        group_bias   fp32 [G]        per balance group (rank, or node) offset on the group choice
                                     (only with ``c2r.group_bias_rate`` > 0, like Megatron's
                                     expert_bias); its non-persistent load counts are
                                     ``local_tokens_per_group`` fp32 [G]

    Statistics (``_last``, read by ``c2r_metrics`` and ``metrics.report``) are computed only while
    ``stats_wanted`` (the metrics owner sets it from its ``recording`` flag), and the statistics
    and co-activation counts only in a micro-batch's first forward, never in the one activation
    recompute re-runs inside backward.

    Derived state (never saved): ``rule`` (built once from the config), the host mirror
    ``_active`` of ``constraint_active`` and the cached ``RoutingTables``; all reset by
    ``_invalidate_caches`` (after a load, a relabelling, new lists, activation).

    Finite-logits check (``c2r.check_finite_logits``), two ways:
        ``defer_finite_check = False`` (default; the router inside a stock Megatron MoELayer):
            each forward syncs once and raises a one-line ValueError before any collective.
        ``defer_finite_check = True`` (set by our ``C2RMoELayer``): no sync; each forward stores
            ``logits_finite``, a 0-d bool tensor on the logits' device, which the layer folds
            into its dispatcher's count exchange so that every rank raises
            ``nonfinite_logits_error(...)`` after it (no extra host round trip, no hang).
        ``logits_finite`` stays None while the check is off.
    """

    def __init__(
        self,
        config,
        pg_collection=None,
        *,
        c2r_config: Optional[C2RRouterConfig] = None,
        **router_kwargs,
    ):
        """``router_kwargs``: what this Megatron's MoELayer passes routers beyond ``config`` and
        ``pg_collection`` (see ``compat.topk_router_kwargs``)."""
        if pg_collection is None:
            pg_collection = compat.get_default_pg_collection()
        init_topk_router(self, config, pg_collection, compat.topk_router_kwargs(router_kwargs))
        c2r_config = c2r_config if c2r_config is not None else C2RRouterConfig()
        ep_size = pg_collection.ep.size() if getattr(pg_collection, "ep", None) is not None else 1
        tp_size = pg_collection.tp.size() if getattr(pg_collection, "tp", None) is not None else 1
        flex_problem = compat.flex_problem(config, tp_size, ep_size)  # before the dispatcher
        if flex_problem is not None:
            raise ValueError(flex_problem)
        self.c2r_config = cfg = c2r_config.resolve(
            num_experts=config.num_moe_experts, topk=config.moe_router_topk, ep_size=ep_size
        )
        self.rule: RoutingRule = rule_for_config(cfg, topk=self.topk)
        check_megatron_features(self.config, self.routing_type, cfg, self.rule)
        num_experts, device = config.num_moe_experts, self.weight.device

        if cfg.expert_to_group is not None:
            expert_to_group_E = torch.tensor(cfg.expert_to_group, dtype=torch.int64)
        else:  # contiguous blocks = the EP ranks' expert sets (after any placement relabelling)
            expert_to_group_E = contiguous_groups(num_experts, cfg.num_groups)
        self.rule.check_groups(expert_to_group_E)
        self.register_buffer("expert_to_group", expert_to_group_E.to(device))
        top_t = cfg.top_t if cfg.top_t is not None else 0
        self.register_buffer(
            "top_t_lists", torch.zeros(num_experts, top_t, dtype=torch.int64, device=device)
        )
        # A rule that needs lists (c2r) with no warm-up starts inactive until lists are installed
        # (set_top_t_lists / a plan file); other constrained rules start active.
        starts_active = self.rule.constrained and not self.rule.needs_lists and cfg.warmup_steps == 0
        self.register_buffer("constraint_active", torch.tensor(starts_active, device=device))
        self.tracker = CollaborationTracker(num_experts).to(device)
        if cfg.group_bias_rate > 0:  # registered only when on (old checkpoints keep loading)
            zeros_G = torch.zeros(self.rule.num_balance_groups, dtype=torch.float32, device=device)
            self.register_buffer("group_bias", zeros_G.clone())
            self.register_buffer("local_tokens_per_group", zeros_G.clone(), persistent=False)
        else:
            self.group_bias = self.local_tokens_per_group = None
        # Soft locality bias (c2r.locality_bias_target): the steered offset on the anchored
        # blocks (saved) and this iteration's (sum of blocks per token, tokens) since its update.
        if cfg.locality_bias_target is not None:
            self.register_buffer("locality_bias", torch.zeros((), dtype=torch.float32, device=device))
            self.register_buffer(
                "local_locality_counts", torch.zeros(2, dtype=torch.float32, device=device), persistent=False
            )
        else:
            self.locality_bias = self.local_locality_counts = None
        # A budget ramp reads the iteration: saved, so a resumed run continues the ramp.
        if cfg.budget_ramp_steps > 0:
            self.register_buffer("schedule_iteration", torch.zeros((), dtype=torch.int64, device=device))
        else:
            self.schedule_iteration = None

        # Whether this forward's statistics (``_last``) are used: the metrics owner sets it from
        # its ``recording`` flag (the entry records only the iterations it logs).
        self.stats_wanted = True
        self.defer_finite_check = False  # set True by C2RMoELayer (see the class docstring)
        self.logits_finite: Optional[torch.Tensor] = None  # 0-d bool, last forward (deferred)
        self._last: Dict[str, object] = {}  # statistics of the last forward (0-d tensors, floats)
        # Node blocks of the statistics (node mode, or c2r.num_nodes in any mode); None: no nodes.
        self._num_nodes: Optional[int] = cfg.num_nodes
        # Caches derived from the buffers above; declared here, reset only by _invalidate_caches.
        self._tables: Optional[RoutingTables] = None
        self._active = starts_active  # host mirror of constraint_active: routing never syncs
        # Host counter set by ``step``: which training iteration the next forwards belong to
        # (preference sampling; not saved, a resumed run restarts the sampling phase).
        self._next_iteration = 0
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _invalidate_caches(self) -> None:
        """Drop every table derived from the buffers (groups, allowed sets) and re-read the
        host mirror of ``constraint_active`` (one host sync; off the hot path). Call after
        anything that changes ``expert_to_group``, ``top_t_lists`` or ``constraint_active``:
        loading, relabelling, new lists, activation."""
        self._tables = None
        self._active = bool(self.constraint_active)

    def _routing_tables(self) -> RoutingTables:
        """The rule's tables for the current buffers, built on first use after an invalidation.
        Also rebuilt when a buffer object was replaced (``Module.to``/``.cuda`` move buffers
        without telling us; in-place loads are covered by ``_invalidate_caches``)."""
        tables = self._tables
        if tables is None or not tables.built_from(self.expert_to_group, self.top_t_lists):
            tables = self._tables = self.rule.tables(self.expert_to_group, self.top_t_lists)
        return tables

    # ------------------------------------------------------------------------------------------
    # Distributed checkpointing
    # ------------------------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's sharded state (every buffer replicated across TP and DP, main replica
        saved; one entry per layer via ``sharded_offsets``) with one change: a zero-size tensor
        (``top_t_lists`` [E, 0] in modes without lists) goes as a ShardedObject, because
        torch_dist's sharding check divides by each dimension (ZeroDivisionError on 0).

        Tracker ``pending`` counts are rank-local, so they are first summed over TP x DP x CP into
        ``counts`` (``tracker.reduce_``, the reduction the warm-up end runs anyway): the saved,
        replicated counts are the whole group's and a resumed run's planner sees them all.
        Collective over that group: every rank builds its sharded state together (a
        dist_checkpointing save or load does)."""
        self.tracker.reduce_(self.tp_dp_cp_group)
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name, value in list(sharded.items()):
            data = getattr(value, "data", None)
            if isinstance(value, ShardedTensor) and data is not None and data.numel() == 0:
                sharded[name] = make_sharded_object_for_checkpoint(
                    data, value.key, sharded_offsets, replica_id=value.replica_id
                )
        return sharded

    # ------------------------------------------------------------------------------------------
    # Lists, groups, schedule
    # ------------------------------------------------------------------------------------------
    def set_top_t_lists(self, top_t_lists_EL: torch.Tensor) -> None:
        """Install [E, L] collaborator lists (from a file or the tracker); validated first."""
        top_t_lists_EL = torch.as_tensor(top_t_lists_EL)
        validate_top_t_lists(top_t_lists_EL, self.config.num_moe_experts, self.topk)
        if self.c2r_config.top_t is not None and top_t_lists_EL.shape[1] != self.c2r_config.top_t:
            raise ValueError(
                f"top_t_lists rows hold {top_t_lists_EL.shape[1]} ids but c2r.top_t="
                f"{self.c2r_config.top_t}: regenerate the lists or change c2r.top_t"
            )
        self.top_t_lists = top_t_lists_EL.to(self.expert_to_group.device, torch.int64).clone()
        self._invalidate_caches()
        if self.rule.needs_lists and self.c2r_config.warmup_steps == 0:
            self._set_active(True)

    def _set_active(self, active: bool) -> None:
        self.constraint_active.fill_(active)
        self._invalidate_caches()

    def activate(self, reduce_group=None) -> None:
        """End the warm-up: sum the tracker over ``reduce_group`` (collective), derive the top-T
        lists (rules that need them) and turn the constraint on."""
        self.tracker.reduce_(reduce_group if reduce_group is not None else self.tp_dp_cp_group)
        if self.rule.needs_lists:
            self.top_t_lists = self.tracker.top_t_lists(self.c2r_config.top_t)
        self._set_active(self.rule.constrained)
        if self.c2r_config.refresh_interval:
            self.tracker.reset_()  # the next refresh sees only its own window

    def refresh_due(self, iteration: int) -> bool:
        """True after training iteration ``iteration`` (0-based) when a refresh window ends:
        c2r lists are re-derived then, and group placement is re-planned by the model's owner
        (the CPU trainer) just before ``step_routers``."""
        cfg, done = self.c2r_config, iteration + 1
        return bool(
            self.rule.constrained and cfg.track_collaboration and cfg.refresh_interval
            and done > cfg.warmup_steps and (done - cfg.warmup_steps) % cfg.refresh_interval == 0
        )

    def step(self, iteration: int) -> None:
        """Advance the schedule after training iteration ``iteration`` (0-based, all ranks).
        The group-bias update is not here: ``step_routers`` batches it over all routers."""
        cfg = self.c2r_config
        done = iteration + 1
        self._next_iteration = done
        if self.schedule_iteration is not None:
            self.schedule_iteration.fill_(done)  # a host int: no sync
        if not self.rule.constrained or not cfg.track_collaboration:
            return
        if (not self._active and done >= cfg.warmup_steps) or self.refresh_due(iteration):
            self.activate()

    @torch.no_grad()
    def update_group_bias_(self, load_G: Optional[torch.Tensor] = None) -> None:
        """Move ``group_bias`` by +-``c2r.group_bias_rate`` toward balance (the sign rule of
        Megatron's ``get_updated_expert_bias``) from the groups' (token, expert) loads since the
        last update, then zero them. ``load_G``: those loads already summed over the ranks that
        route (``update_group_biases`` passes them: one collective for all routers); None ->
        sum ``local_tokens_per_group`` over TP x DP x CP (Megatron's expert-bias group) here, a
        collective. No-op when the option is off. Called once per iteration by ``step_routers``."""
        if self.group_bias is None:
            return
        if load_G is None:
            load_G = self.local_tokens_per_group.clone()
            all_reduce_sum_(load_G, self.tp_dp_cp_group)
        self.group_bias.copy_(updated_group_bias(load_G, self.group_bias, self.c2r_config.group_bias_rate))
        self.local_tokens_per_group.zero_()

    def relabel_experts_(self, order: torch.Tensor, optimizer=None) -> None:
        """Apply a placement: new expert i is old expert ``order[i]``. Every router tensor moves
        as ``placement.permutation.ROUTER_STATE`` says (weight rows, bias, expert bias and its
        counts, tracker rows and columns, top-T lists with their ids translated, a non-default
        group map; the contiguous default groups stay, which is the point of relabelling), with
        the grads and ``optimizer`` state of weight / bias; then every derived cache is reset."""
        order_E = check_order(order, self.config.num_moe_experts)
        permute_module_state_(self, order_E, ROUTER_STATE, optimizer)
        self._invalidate_caches()

    # Buffers that must stay fp32 under --bf16/--fp16: Float16Module casts every floating buffer
    # to half precision, where a 1e-3 bias step vanishes once |bias| >= 0.5 and integer counts
    # above 256 round (and would be all-reduced rounded).
    _FP32_BUFFERS = ("expert_bias", "local_tokens_per_expert", "group_bias", "local_tokens_per_group",
                     "locality_bias", "local_locality_counts")

    def _maintain_float32_expert_bias(self):
        """Megatron's hook (called at the start of every forward, before a state-dict load and
        save): puts the expert bias, the group bias and their load counts back in fp32 after
        ``Float16Module``'s cast, as Megatron does for its expert bias alone."""
        for name in self._FP32_BUFFERS:
            buffer = getattr(self, name, None)
            if buffer is not None and buffer.dtype != torch.float32:
                buffer.data = buffer.data.to(torch.float32)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router linear: logits [S, B, E] in the router dtype. Megatron's own gating on CUDA;
        elsewhere the same math device-agnostically (``compat.use_stock_router_gating``)."""
        if compat.use_stock_router_gating(self.weight.device):
            return super().gating(input)
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        return gating_linear(input, self.weight, self.bias, router_dtype)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """logits [S, B, E] -> (probs [T, E], routing_map [T, E]); see the class docstring.
        ``padding_mask`` [S, B] bool, True marks padding (Megatron's convention)."""
        logits_TE = logits.view(-1, self.config.num_moe_experts)
        padding_T = padding_mask.reshape(-1) if padding_mask is not None else None
        self._check_finite_logits(logits_TE)
        if self.rule.needs_lists and not self._active and self.c2r_config.warmup_steps == 0:
            raise ValueError(
                f"c2r.mode={self.c2r_config.mode!r} with c2r.warmup_steps=0 needs top-T lists "
                f"before the first forward (layer {self.layer_number}): load them (megatron_c2r."
                "moe.lists.load_top_t_lists_) or set c2r.warmup_steps > 0 to derive them"
            )
        training = self.training and torch.is_grad_enabled()
        # Statistics and co-activation counts once per micro-batch: in the first forward, never
        # in the forward activation recompute re-runs inside backward (under --recompute-modules
        # moe the first forward runs without grad, so `training` alone would count the
        # recomputed one instead).
        recomputed = compat.in_backward()
        counting = (
            self.training and self.c2r_config.track_collaboration and not recomputed
        )
        constrained = self._active and self.rule.constrained
        if constrained:
            # Under the constraint the routing map only confirms the current groups: the tracker
            # counts what plain top-k would have picked, on sampled iterations.
            sampled = self._next_iteration % self.c2r_config.preference_sample_interval == 0
            probs, routing_map, counted = self._constrained_routing(
                logits_TE, padding_T, logits.shape[:2], want_preferred=counting and sampled
            )
        else:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            counted = routing_map  # plain top-k (warm-up, topk mode): its map is the preference
        if counting and counted is not None:
            self.tracker.record(counted, padding_T)
        if training:
            probs = attach_collaboration_penalty(self, probs, logits_TE, padding_T)
            probs = attach_group_balance_losses(self, probs, logits_TE, routing_map, padding_T)
        if self.stats_wanted and not recomputed:
            self._record_stats(probs, routing_map, padding_T)
        return probs, routing_map

    def _check_finite_logits(self, logits_TE: torch.Tensor) -> None:
        """``c2r.check_finite_logits``: sync and raise now, or record ``logits_finite`` for the
        layer (``defer_finite_check``); see the class docstring."""
        if not self.c2r_config.check_finite_logits:
            return
        # NaN/Inf propagate into the sum: one reduction instead of an elementwise isfinite pass.
        finite = torch.isfinite(logits_TE.detach().sum())
        if self.defer_finite_check:
            self.logits_finite = finite
        elif not bool(finite):
            bad = int((~torch.isfinite(logits_TE)).any(dim=1).sum())
            raise self.nonfinite_logits_error(f"for {bad} of {logits_TE.shape[0]} tokens")

    def nonfinite_logits_error(self, where: str) -> ValueError:
        """The one-line error for NaN/Inf router logits; ``where`` says which tokens or ranks
        (e.g. "for 3 of 4096 tokens", "on EP rank(s) [1]")."""
        return ValueError(
            f"router logits of layer {self.layer_number} hold NaN/Inf {where}: check the input "
            "activations / lower the LR"
        )

    def _drop_over_capacity(self, probs_TE, routing_map_TE):
        """Megatron's capacity dropping (``moe_expert_capacity_factor``), as ``TopKRouter``
        applies it; ``(probs_TE, routing_map_TE)`` unchanged without a capacity factor."""
        mc = self.config
        if mc.moe_expert_capacity_factor is None:
            return probs_TE, routing_map_TE
        return apply_router_token_dropping(
            probs_TE,
            routing_map_TE,
            router_topk=self.topk,
            capacity_factor=mc.moe_expert_capacity_factor,
            drop_policy=mc.moe_token_drop_policy,
            pad_to_capacity=mc.moe_pad_expert_input_to_capacity,
        )

    def _constrained_routing(self, logits_TE, padding_T, seq_batch, want_preferred=False):
        """TopKRouter.routing with the rule's selection in place of plain top-k.
        ``logits_TE`` [T, E], ``padding_T`` [T] or None, ``seq_batch`` = (S, B).
        Returns (probs_TE, routing_map_TE, preferred_TE): ``preferred_TE`` is plain top-k's map
        of the same scores (expert bias included, as Megatron ranks) if ``want_preferred`` (the
        tracker counts it), else None."""
        mc = self.config
        seq_length, bsz = seq_batch
        logits_TE = self.apply_z_loss(logits_TE, padding_mask=padding_T)

        # 1. Select experts under the constraint, on the tensor Megatron would run top-k on.
        scores_TE = selection_scores(
            logits_TE,
            score_function=self.score_function,
            use_pre_softmax=mc.moe_router_pre_softmax,
            expert_bias_E=self.expert_bias if self.score_function == "sigmoid" else None,
        )
        tables = self._routing_tables()
        indices_TK = self.rule.select(scores_TE, tables, self.group_bias, **self._rule_inputs())
        preferred_TE = None
        if want_preferred:
            preferred_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter_(
                1, scores_TE.topk(self.topk, dim=1).indices, True
            )
        # 2. Megatron's probs for that selection.
        probs_TE, routing_map_TE = probs_from_selection(
            logits_TE,
            indices_TK,
            score_function=self.score_function,
            use_pre_softmax=mc.moe_router_pre_softmax,
            scaling_factor=mc.moe_router_topk_scaling_factor,
        )
        # 3. Capacity dropping, as TopKRouter does.
        probs_TE, routing_map_TE = self._drop_over_capacity(probs_TE, routing_map_TE)
        # 4. Aux losses on the constrained routing map (the load the experts actually get), or
        # on plain top-k's map of the full scores (c2r.aux_loss_map: preferred, and 'auto' in
        # node mode; as Megatron's compute_routing_scores_for_aux_loss counts its group-limited
        # routing).
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            scores_for_aux_TE = full_scores(logits_TE, self.score_function)
            if self.c2r_config.aux_loss_counts_preferred:
                aux_map_TE = torch.zeros_like(routing_map_TE).scatter_(
                    1, scores_for_aux_TE.topk(self.topk, dim=1).indices, True
                )
            else:
                aux_map_TE = routing_map_TE
            if padding_T is not None:
                scores_for_aux_TE = scores_for_aux_TE * (~padding_T).unsqueeze(-1)
                aux_map_TE = aux_map_TE & ~padding_T.unsqueeze(-1)
            masked = padding_T is not None
            probs_TE = self._apply_aux_loss(
                probs_TE, scores_for_aux_TE, aux_map_TE, with_padding_mask=masked
            )
            probs_TE = self._apply_seq_aux_loss(
                probs_TE, scores_for_aux_TE, aux_map_TE, seq_length, bsz, with_padding_mask=masked
            )
            probs_TE = self._apply_global_aux_loss(
                probs_TE, scores_for_aux_TE, aux_map_TE, with_padding_mask=masked
            )
        # 5. Expert-, group- and locality-bias counts of the constrained map (the biases are
        # updated after the iteration: Megatron's by the training loop, ours by step_routers).
        counts_bias = self.enable_expert_bias or self.group_bias is not None or self.locality_bias is not None
        if torch.is_grad_enabled() and counts_bias:
            with torch.no_grad():
                counted_TE = (
                    routing_map_TE if padding_T is None else routing_map_TE & ~padding_T.unsqueeze(-1)
                )
                if self.enable_expert_bias:
                    self.local_tokens_per_expert += counted_TE.sum(dim=0)
                if self.group_bias is not None:
                    self.local_tokens_per_group += group_loads(counted_TE, self.rule.balance(tables)[1])[0]
                if self.locality_bias is not None:  # blocks of the real tokens, and their count
                    blocks_T = self.rule.blocks_T(counted_TE, tables).float()
                    tokens = counted_TE.any(dim=1).sum()
                    self.local_locality_counts += torch.stack((blocks_T.sum(), tokens.float()))
        return probs_TE, routing_map_TE, preferred_TE

    def _rule_inputs(self) -> Dict[str, object]:
        """What the rule's ``select`` takes beyond the scores: its scheduled values (a budget
        ramp; host floats from host counters) and the steered locality bias (a tensor)."""
        inputs: Dict[str, object] = dict(
            self.rule.router_inputs(self._next_iteration - self.c2r_config.warmup_steps)
        )
        if self.locality_bias is not None:
            inputs["locality_bias"] = self.locality_bias
        return inputs

    @torch.no_grad()
    def _record_stats(self, probs_TE, routing_map_TE, padding_T) -> None:
        """Cheap per-step statistics, kept as tensors (no host sync) until ``c2r_metrics``.
        [E]-sized reductions of the map plus one [T, E] bool gather per statistic."""
        tables = self._routing_tables()
        groups_T = groups_per_token(
            routing_map_TE, tables.expert_to_group_E, self.rule.num_groups, groups_GN=tables.groups_GN
        ).float()
        per_token_T = {
            "groups_per_token": groups_T,
            "violation_rate": self.rule.violated_T(
                probs_TE, routing_map_TE, groups_T, tables, self._active
            ).float(),
            **self.rule.extra_stats_T(routing_map_TE, tables),
        }
        # Balance: the busiest group's (token, expert) pairs over the mean (the experts' work;
        # an EP step waits for its busiest rank), and the same over node blocks.
        counted_TE = routing_map_TE
        if padding_T is not None:
            counted_TE = routing_map_TE & ~padding_T.unsqueeze(-1)
        pairs_G = group_loads(counted_TE, tables.groups_GN)[0]
        self._last["group_load_max_over_mean"] = _max_over_mean(pairs_G)
        if self._num_nodes is not None:  # nodes = contiguous blocks of G / D groups
            nodes_DX = tables.groups_GN.reshape(self._num_nodes, -1)
            per_token_T["nodes_per_token"] = groups_per_token(
                routing_map_TE, tables.expert_to_group_E, self._num_nodes, groups_GN=nodes_DX
            ).float()
            pairs_D = pairs_G.view(self._num_nodes, -1).sum(dim=1)
            self._last["node_load_max_over_mean"] = _max_over_mean(pairs_D)
        if padding_T is None:
            for name, value_T in per_token_T.items():
                self._last[name] = value_T.mean()
        else:  # a weighted mean, not boolean indexing (which syncs to size its output)
            valid_T = (~padding_T).float()
            num_valid = valid_T.sum().clamp(min=1.0)
            for name, value_T in per_token_T.items():
                self._last[name] = (value_T * valid_T).sum() / num_valid
        self._last["constraint_active"] = float(self._active)
        for name, value in self._rule_inputs().items():  # the budget now, the locality bias
            self._last[name] = value.detach().clone() if torch.is_tensor(value) else value

    def c2r_metrics(self) -> Dict[str, float]:
        """Per-layer metrics of the last forward (host sync happens here, at logging time).
        groups_per_token: distinct groups (= EP ranks by default) per token; violation_rate:
        share of tokens outside the rule (``rule.violated_T``: 0 in hard modes; the 1-group
        reference in topk mode and during a c2r warm-up); penalty: the collaboration penalty
        (without its coefficient); constraint_active: 0/1; group_load_max_over_mean: the
        busiest group's (token, expert) pairs over the mean; with a node layout (node mode, or
        ``c2r.num_nodes`` in any mode) nodes_per_token and node_load_max_over_mean, the same
        over node blocks."""
        return {k: float(v) for k, v in self._last.items()}


def _max_over_mean(load_G: torch.Tensor) -> torch.Tensor:
    """0-d fp32: the largest entry of ``load_G`` over its mean (1 = balanced; no host sync)."""
    return load_G.max() / load_G.mean().clamp(min=1e-12)


def _refresh_after_load(module: "C2RRouter", incompatible_keys) -> None:
    module._invalidate_caches()
    if module.schedule_iteration is not None:  # the ramp's host counter (one sync, at load)
        module._next_iteration = int(module.schedule_iteration)


def c2r_routers(model: torch.nn.Module) -> Iterable[C2RRouter]:
    """All C2R routers of a model (or a list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, C2RRouter):
                yield module


def step_routers(model, iteration: int) -> None:
    """Call once per training iteration, after the optimizer step, on every rank: updates the
    group biases (``update_group_biases``: with ``c2r.group_bias_rate`` > 0 only), ends the
    warm-up (derives lists, turns the constraint on) and refreshes lists on schedule."""
    update_group_biases(list(c2r_routers(model)))
    for router in c2r_routers(model):
        router.step(iteration)
