"""BigMac low-dimensional dispatch (``c2r.dispatch_dim: d``): descend, communicate, compute,
communicate, ascend.

A fine-grained MoE ships each token's full hidden state H to every destination rank. BigMac
(Jin et al., "BigMac: A Communication-Efficient Mixture-of-Experts Model Structure", AAAI 2025)
projects the token down to d < H once, *after* the router scored it at full width, ships and runs
the experts at d, combines at d and projects back up: every row that crosses the EP all-to-all is
d/H of today's, and with our dedup dispatchers (one row per destination rank or node) the bytes
shrink by the product of the two reductions.

:class:`LowDimMoELayer` is a :class:`~megatron_c2r.moe.layer.C2RMoELayer` that overrides two of
Megatron's ``MoELayer`` stages and nothing else:

    route(hidden_TH)                    the router at full width H (unchanged)
    preprocess(hidden_TH, probs, map)   x_TZ = dispatch_down(hidden_TH), then the dispatcher's
                                        dispatch_preprocess on x_TZ       (override)
    dispatch / experts / combine        unchanged, on Z-wide rows; the experts are Megatron's
                                        SequentialMLP / GroupedMLP / TEGroupedMLP built from a
                                        config copy with hidden_size = d and
                                        moe_ffn_hidden_size = c2r.dispatch_ffn_hidden_size
    postprocess(y, shared_TH)           dispatcher's combine_postprocess, then
                                        dispatch_up (Z -> H), then + shared experts  (override)

Shared experts, the router, aux losses and the tracker see the full-width token; the dispatcher
(flat or two-level dedup, or Megatron's with ``dispatcher="megatron"``) is width-agnostic and its
``comm_stats`` count the bytes of the rows it really ships. Megatron 0.16.1's own
``moe_latent_size`` is the same idea but needs Transformer Engine for its projections and refuses
``GroupedMLP``; this layer needs neither and lets the expert FFN width differ from the dense one.

Parameters added per MoE layer: ``dispatch_down.weight`` [d, H] and ``dispatch_up.weight`` [H, d]
(plus biases with ``add_bias_linear``), dense (replicated over TP/EP, data-parallel reduced like
the router weight; marked ``sequence_parallel`` so Megatron sums their grads over TP under
sequence parallelism), saved in state dicts and torch_dist checkpoints under those names.

Shape suffixes: the ``comm/`` legend (``megatron_c2r/comm/__init__.py``) for T tokens and H hidden,
plus Z = the dispatch width d (``c2r.dispatch_dim``; no other meaning in the package).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

from megatron_c2r import compat
from megatron_c2r.moe.layer import C2RMoELayer


def check_dispatch_dims(config, dispatch_dim: int, dispatch_ffn_hidden_size: Optional[int]) -> int:
    """Validate BigMac's sizes against the model config; returns the expert FFN width F.

    One-line ``ValueError`` naming the field, its value and the fix, raised before anything is
    allocated. ``dispatch_ffn_hidden_size`` None -> the model's ``moe_ffn_hidden_size``.
    """
    hidden = config.hidden_size
    if not isinstance(dispatch_dim, int) or not 1 <= dispatch_dim <= hidden:
        raise ValueError(
            f"c2r.dispatch_dim={dispatch_dim!r} must be an int in [1, hidden_size={hidden}] "
            f"(BigMac ships d-wide rows; e.g. {max(hidden // 4, 1)} for 1/4 of the bytes)"
        )
    ffn = config.moe_ffn_hidden_size if dispatch_ffn_hidden_size is None else dispatch_ffn_hidden_size
    if not isinstance(ffn, int) or ffn < 1:
        raise ValueError(
            f"c2r.dispatch_ffn_hidden_size={dispatch_ffn_hidden_size!r} must be a positive int "
            "(the experts' FFN width at d) or unset (the model's moe_ffn_hidden_size)"
        )
    if getattr(config, "moe_latent_size", None):
        raise ValueError(
            f"moe_latent_size={config.moe_latent_size} and c2r.dispatch_dim={dispatch_dim} both "
            "project the MoE layer's tokens: keep one (unset moe_latent_size)"
        )
    if config.moe_shared_expert_overlap:
        raise ValueError(
            "moe_shared_expert_overlap=True runs the shared experts inside the dispatcher, on the "
            "d-wide rows, with c2r.dispatch_dim: set moe_shared_expert_overlap=False"
        )
    graphed = compat.moe_cuda_graph_capture(config)
    if graphed is not None:
        raise ValueError(
            f"{graphed} captures the MoE layer in a CUDA graph, which would skip c2r.dispatch_dim's "
            "projections: set cuda_graph_impl='none' or graph only attn/mlp/mamba scopes"
        )
    return ffn


def expert_config(config, dispatch_dim: int, expert_ffn_hidden_size: int):
    """The config copy the experts are built from: ``hidden_size = d`` and
    ``moe_ffn_hidden_size = F``; every other field (activation, GLU, init, dtype, parallel
    sizes, grouped GEMM) as the model's. Re-runs ``TransformerConfig.__post_init__``, so a size
    Megatron cannot split (e.g. F over expert TP) fails there, at build time."""
    return dataclasses.replace(
        config, hidden_size=dispatch_dim, moe_ffn_hidden_size=expert_ffn_hidden_size
    )


class DispatchProjection(MegatronModule):
    """One shared linear map ``[*, in] -> [*, out]`` (``weight`` [out, in], optional ``bias``).

    Dense and replicated: the same on every TP/EP rank (initialised from the default torch
    generator, as Megatron's router weight is), data-parallel reduced, ``sequence_parallel`` set
    from the config so Megatron's ``finalize_model_grads`` sums its grads over TP under sequence
    parallelism. Weights in ``params_dtype``; computes in the input's dtype, as Megatron's
    linear layers do under its mixed-precision wrapper.
    """

    def __init__(self, config, in_features: int, out_features: int, init_method) -> None:
        super().__init__(config)
        self.weight = torch.nn.Parameter(
            torch.empty((out_features, in_features), dtype=config.params_dtype)
        )
        if config.perform_initialization:
            init_method(self.weight)
        self.bias = None
        if config.add_bias_linear:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=config.params_dtype))
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LowDimMoELayer(C2RMoELayer):
    """``C2RMoELayer`` whose experts and dispatcher work at width d (BigMac).

    Args:
        config: the model's ``TransformerConfig`` (hidden size H); router, shared experts and
            the projections' outer side use it unchanged.
        submodules: ``MoESubmodules``; ``experts`` is built from :func:`expert_config`.
        dispatch_dim: d, the width of every dispatched row (1 <= d <= H).
        dispatch_ffn_hidden_size: F, the experts' FFN width at d; None -> the model's
            ``moe_ffn_hidden_size``.
        args, kwargs: forwarded to ``C2RMoELayer``: ``layer_number``, ``pg_collection``,
            ``dispatcher`` (``"dedup"`` with its ``hierarchy`` / ``gpus_per_node`` /
            ``topology_memo``, or ``"megatron"``) and the rest of its ``layer_kwargs``.

    Forward: ``[S, B, H]`` in, ``[S, B, H]`` out, like ``MoELayer``. Host syncs and collectives
    are the dispatcher's (no new ones); the projections are two dense GEMMs per micro-batch of
    T x H x d each.
    """

    def __init__(
        self,
        config,
        submodules: Optional[MoESubmodules] = None,
        *args,
        dispatch_dim: Optional[int] = None,
        dispatch_ffn_hidden_size: Optional[int] = None,
        **kwargs,
    ):
        ffn = check_dispatch_dims(config, dispatch_dim, dispatch_ffn_hidden_size)
        inner = expert_config(config, dispatch_dim, ffn)
        # MoELayer builds its experts from the layer config; build a placeholder there
        # (Identity ignores its arguments, nothing is allocated) and the real experts at d below.
        placeholder = dataclasses.replace(submodules, experts=torch.nn.Identity)
        super().__init__(config, placeholder, *args, **kwargs)
        self.submodules = submodules
        self.dispatch_dim, self.expert_ffn_hidden_size = dispatch_dim, ffn
        self.expert_config = inner
        self.experts = compat.build_from_spec(  # a ModuleSpec on 0.16/0.17, a partial on 0.18+
            submodules.experts, num_local_experts=self.num_local_experts, config=inner,
            pg_collection=self.pg_collection,
        )
        hidden = config.hidden_size
        self.dispatch_down = DispatchProjection(config, hidden, dispatch_dim, config.init_method)
        self.dispatch_up = DispatchProjection(
            config, dispatch_dim, hidden, config.output_layer_init_method
        )

    def preprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        """Descend: ``[S, B, H]`` -> ``[S, B, d]`` (the router already scored the H-wide token),
        then Megatron's preprocess (the dispatcher's ``dispatch_preprocess``) on the d-wide one."""
        x_TZ = self.dispatch_down(hidden_states)
        return super().preprocess(x_TZ, probs, routing_map)

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        """The dispatcher's ``combine_postprocess`` (``[S, B, d]``), ascend to ``[S, B, H]``,
        then add the shared experts' (full-width) output: ``MoELayer.postprocess`` with the up
        projection where Megatron's latent projection would be."""
        y_TZ = self.token_dispatcher.combine_postprocess(output)
        y_TH = self.dispatch_up(y_TZ)
        if shared_expert_output is not None:
            y_TH = y_TH + shared_expert_output
        return y_TH


def low_dim_moe_spec(
    moe_spec: Any, *, dispatch_dim: int, dispatch_ffn_hidden_size: Optional[int] = None
) -> Any:
    """A copy of an MoE layer spec (``ModuleSpec`` or 0.18+ partial) that builds
    :class:`LowDimMoELayer`: a ``C2RMoELayer`` spec keeps its keywords (dispatcher, hierarchy,
    topology memo); Megatron's own ``MoELayer`` spec becomes ``dispatcher="megatron"`` (its
    config's dispatcher type). Router and experts specs unchanged."""
    cls = compat.moe_layer_class(moe_spec)
    if not (isinstance(cls, type) and issubclass(cls, MoELayer)):
        raise ValueError(f"c2r.dispatch_dim needs an MoELayer spec, got {cls!r}")
    params = dict(dispatch_dim=dispatch_dim, dispatch_ffn_hidden_size=dispatch_ffn_hidden_size)
    if not issubclass(cls, C2RMoELayer):
        params["dispatcher"] = "megatron"
    return compat.with_moe_layer_params(moe_spec, LowDimMoELayer, **params)
