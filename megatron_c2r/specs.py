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

Plain ``pretrain_gpt.py`` never calls ``step_routers`` and builds the MTP layers from its own
stock spec, so every preset is a warm-up-free mode (nothing to step) and the preset layer class
refuses, in one line when the first layer is built, the settings it would silently get wrong:
    * ``--mtp-num-layers`` (the MTP layers would route with Megatron's stock router),
    * ``--moe-layer-freq`` with dense layers, ``--multi-latent-attention``, ``--qk-layernorm``
      (the preset is one fixed all-MoE, standard-attention layer),
    * no ``--num-experts``, and a router with a warm-up or refresh windows (never stepped).
For those, and for any other C2R option (warm-up, c2r/top-T mode, penalty, explicit groups) and
our ``moe/c2r/*`` metrics, use ``megatron-c2r pretrain CONFIG.yaml`` or
``python -m megatron_c2r.megatron_lm``, which build the spec from the config and drive the
router schedule. ``--moe-grouped-gemm`` is decided by the spec (local: SequentialMLP, TE:
grouped GEMM).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_c2r import compat
from megatron_c2r.moe.options import C2ROptions
from megatron_c2r.moe.spec_builders import apply_c2r_to_layer_spec
from megatron_c2r.routing.config import C2RRouterConfig

_ENTRY = "python -m megatron_c2r.megatron_lm (or megatron-c2r pretrain CONFIG.yaml)"

_OPTIONS = {
    "group1": C2ROptions(router=C2RRouterConfig(mode="group", max_groups=1)),
    "group2": C2ROptions(router=C2RRouterConfig(mode="group", max_groups=2)),
    "topk": C2ROptions(router=C2RRouterConfig(mode="topk")),
}


def _router_config(layer_submodules) -> Optional[C2RRouterConfig]:
    """The ``C2RRouterConfig`` bound into a layer spec's MoE router builder, if any."""
    mlp = getattr(layer_submodules, "mlp", None)
    if mlp is None or not (compat.is_partial_spec(mlp) or hasattr(mlp, "submodules")):
        return None
    router = getattr(compat.moe_submodules(mlp), "router", None)
    return getattr(router, "keywords", {}).get("c2r_config")


def preset_problem(config, layer_submodules) -> Optional[str]:
    """The one-line reason a preset layer cannot serve ``config`` (a ``TransformerConfig``) under
    plain ``pretrain_gpt.py``, or None. ``layer_submodules``: the preset's
    ``TransformerLayerSubmodules`` (its router config is checked for a schedule). Pure."""
    prefix = "pretrain_gpt.py --spec megatron_c2r.specs"
    if not config.num_moe_experts:
        return f"{prefix}: --num-experts is not set; the presets build MoE layers, add it"
    if getattr(config, "mtp_num_layers", None):
        return (
            f"{prefix} cannot serve --mtp-num-layers={config.mtp_num_layers}: pretrain_gpt.py "
            f"gives MTP layers Megatron's stock router; use {_ENTRY}, whose MTP layers are C2R"
        )
    freq = getattr(config, "moe_layer_freq", 1)
    if (freq != 1 and not isinstance(freq, list)) or (isinstance(freq, list) and 0 in freq):
        return (
            f"{prefix} makes every layer MoE, so --moe-layer-freq={freq} would be ignored: use "
            f"{_ENTRY}"
        )
    for flag, on in (
        ("--multi-latent-attention", getattr(config, "multi_latent_attention", False)),
        ("--qk-layernorm", getattr(config, "qk_layernorm", False)),
    ):
        if on:
            return f"{prefix} is a standard-attention layer, so {flag} would be ignored: use {_ENTRY}"
    router = _router_config(layer_submodules)
    if router is not None and (router.warmup_steps or router.refresh_interval):
        return (
            f"{prefix}: c2r.warmup_steps={router.warmup_steps}, c2r.refresh_interval="
            f"{router.refresh_interval} need step_routers() every iteration, which pretrain_gpt.py "
            f"never calls (the warm-up would never end): use {_ENTRY}"
        )
    return None


class _PresetChecks:
    """Mixin for a preset's transformer-layer class: ``preset_problem`` before anything is built."""

    def __init__(self, config, submodules, *args, **kwargs):
        problem = preset_problem(config, submodules)
        if problem:
            raise ValueError(problem)
        super().__init__(config, submodules, *args, **kwargs)


_PRESET_CLASSES: dict = {}


def _preset_layer_class(base: type) -> type:
    """``base`` (the stock spec's layer class, e.g. ``TransformerLayer``) with the preset checks;
    one subclass per base, so the preset keeps whatever layer class this Megatron uses."""
    if base not in _PRESET_CLASSES:
        name = f"C2RPreset{base.__name__}"
        _PRESET_CLASSES[base] = type(name, (_PresetChecks, base), {"__module__": __name__})
    return _PRESET_CLASSES[base]


def _preset(stock_layer_spec, options: C2ROptions):
    """A C2R'd stock layer spec whose layer class runs the preset checks."""
    spec = apply_c2r_to_layer_spec(stock_layer_spec, options)
    return dataclasses.replace(spec, module=_preset_layer_class(spec.module))


# num_experts only needs to be non-None here: the layer reads the real count from the config.
_local = get_gpt_layer_local_spec(num_experts=1, moe_grouped_gemm=False)
group1_local = _preset(_local, _OPTIONS["group1"])
group2_local = _preset(_local, _OPTIONS["group2"])
topk_local = _preset(_local, _OPTIONS["topk"])

if compat.HAVE_TE:  # pragma: no cover (GPU images)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    _te = get_gpt_layer_with_transformer_engine_spec(num_experts=1, moe_grouped_gemm=True)
    group1_te = _preset(_te, _OPTIONS["group1"])
    group2_te = _preset(_te, _OPTIONS["group2"])
    topk_te = _preset(_te, _OPTIONS["topk"])
