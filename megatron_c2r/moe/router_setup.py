"""How ``C2RRouter`` is built on Megatron's ``TopKRouter``: a CPU-safe ``TopKRouter.__init__``
and the one-line refusals of Megatron router options that contradict a constrained rule.

Both run once, at construction, before any buffer of ours exists; nothing here is on the hot
path. Kept apart from ``moe/router.py`` so that the router module holds only the routing adapter.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.moe.router import TopKRouter


def global_aux_coeff(config) -> float:
    """The ``global_aux_loss`` coefficient of a Megatron config (0.0 when that loss is off);
    ``moe_router_load_balancing_type`` may be one name or a list paired with the coefficients."""
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    if isinstance(types, str):
        return coeffs if types == "global_aux_loss" else 0.0
    if isinstance(types, (list, tuple)) and "global_aux_loss" in types:
        return coeffs[types.index("global_aux_loss")]
    return 0.0


def init_topk_router(router: TopKRouter, config, pg_collection, router_kwargs: dict) -> None:
    """``TopKRouter.__init__(router, ...)``. The stock constructor allocates its expert-bias /
    global-aux buffers on ``torch.cuda.current_device()``; without CUDA it is run with those
    features off and the same buffers (names, dtypes, persistence) are registered on the
    weight's device here, so a CPU router behaves like the stock one on a GPU."""
    needs_cuda = config.moe_router_enable_expert_bias or global_aux_coeff(config) > 0
    if torch.cuda.is_available() or not needs_cuda:
        TopKRouter.__init__(router, config=config, pg_collection=pg_collection, **router_kwargs)
        return
    init_config = copy.copy(config)
    init_config.moe_router_enable_expert_bias = False
    init_config.moe_router_load_balancing_type = "none"
    TopKRouter.__init__(router, config=init_config, pg_collection=pg_collection, **router_kwargs)
    router.config = config
    router.routing_type = config.moe_router_load_balancing_type
    router.enable_expert_bias = config.moe_router_enable_expert_bias
    device, num_experts = router.weight.device, config.num_moe_experts
    zeros_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    if router.enable_expert_bias:
        del router.local_tokens_per_expert, router.expert_bias  # TopKRouter set them to None
        router.register_buffer("local_tokens_per_expert", zeros_E.clone(), persistent=False)
        router.register_buffer("expert_bias", zeros_E.clone())
    if router.get_aux_loss_coeff("global_aux_loss") > 0:
        del router.global_tokens_per_expert, router.ga_steps
        router.register_buffer("global_tokens_per_expert", zeros_E.clone(), persistent=False)
        router.register_buffer(
            "ga_steps", torch.tensor(0, dtype=torch.float32, device=device), persistent=False
        )


def check_megatron_features(config, routing_type, c2r_config, rule) -> None:
    """Reject Megatron router options that contradict a constrained ``rule`` (one-line
    ValueErrors naming the option and the fix). ``routing_type``: the router's
    ``moe_router_load_balancing_type``; ``c2r_config``: the resolved ``C2RRouterConfig``."""
    if not rule.constrained:
        return
    mode = c2r_config.mode
    if routing_type == "sinkhorn":
        raise ValueError(
            f"c2r.mode={mode!r} cannot be combined with moe_router_load_balancing_type="
            "'sinkhorn': use aux_loss/seq_aux_loss/global_aux_loss/none"
        )
    if config.moe_router_num_groups or config.moe_router_group_topk:
        raise ValueError(
            f"c2r.mode={mode!r} replaces Megatron's group-limited routing: unset "
            f"moe_router_num_groups={config.moe_router_num_groups} and moe_router_group_topk="
            f"{config.moe_router_group_topk} (use c2r.mode='group' or 'node' with "
            "c2r.group_selection='group_score' for the same rule)"
        )
    if config.moe_router_fusion:
        raise ValueError(f"c2r.mode={mode!r} selects experts in PyTorch: set moe_router_fusion=False")
    if config.moe_enable_routing_replay:
        raise ValueError(f"c2r.mode={mode!r} does not support moe_enable_routing_replay=True")
