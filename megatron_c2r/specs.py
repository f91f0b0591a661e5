"""Ready-made layer specs for ``pretrain_gpt.py --spec megatron_c2r.specs <name>``.

Megatron-LM's ``--spec MODULE NAME`` imports ``NAME`` from ``MODULE`` and uses the object as is
(it is not called, so it cannot see the model config) as the spec of *every* decoder layer,
bypassing the MoE auto-spec. These objects are therefore fixed at import time::

    name            router (C2RRouterConfig)                         dispatcher  modules
    group1_local    mode=group, max_groups=1, anchored (1 rank/token)  dedup       Megatron local
    group2_local    mode=group, max_groups=2, anchored                 dedup       Megatron local
    topk_local      mode=topk (Megatron's routing, tracker on)         dedup       Megatron local
    group1_te, group2_te, topk_te   the same with transformer-engine modules and grouped GEMM
                                    (defined only when transformer-engine imports)

What they express: an all-MoE decoder (every layer MoE) with shared experts if
``--moe-shared-expert-intermediate-size`` is set; groups = the EP ranks (num_groups defaults to
``--expert-model-parallel-size`` when the router is built); the C2R router and our dispatcher.

What they cannot express (use ``megatron-c2r pretrain CONFIG.yaml`` or
``python -m megatron_c2r.megatron_lm`` instead, which build the spec from the config):
    * dense/MoE interleave (``--moe-layer-freq``), multi-latent attention, qk-layernorm, MTP;
    * any other C2R option (warm-up, c2r/top-T mode, penalty, explicit groups): ``pretrain_gpt.py``
      does not parse our ``--c2r-*`` flags;
    * the router schedule and ``moe/c2r/*`` metrics: ``pretrain_gpt.py`` never calls
      ``step_routers``, so keep ``warmup_steps=0`` modes (all of the above are);
    * ``--moe-grouped-gemm`` is decided by the spec (local: SequentialMLP, TE: grouped GEMM).
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_c2r import compat
from megatron_c2r.config import C2ROptions
from megatron_c2r.moe.spec_builders import apply_c2r_to_layer_spec
from megatron_c2r.routing.config import C2RRouterConfig

_OPTIONS = {
    "group1": C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1)),
    "group2": C2ROptions(router=C2RRouterConfig(mode="group", max_groups=2)),
    "topk": C2ROptions(router=C2RRouterConfig(mode="topk")),
}

# num_experts only needs to be non-None here: the layer reads the real count from the config.
_local = get_gpt_layer_local_spec(num_experts=1, moe_grouped_gemm=False)
group1_local = apply_c2r_to_layer_spec(_local, _OPTIONS["group1"])
group2_local = apply_c2r_to_layer_spec(_local, _OPTIONS["group2"])
topk_local = apply_c2r_to_layer_spec(_local, _OPTIONS["topk"])

if compat.HAVE_TE:  # pragma: no cover (GPU images)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    _te = get_gpt_layer_with_transformer_engine_spec(num_experts=1, moe_grouped_gemm=True)
    group1_te = apply_c2r_to_layer_spec(_te, _OPTIONS["group1"])
    group2_te = apply_c2r_to_layer_spec(_te, _OPTIONS["group2"])
    topk_te = apply_c2r_to_layer_spec(_te, _OPTIONS["topk"])
