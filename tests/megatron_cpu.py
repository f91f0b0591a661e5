"""Test-only adaptations that let *stock* Megatron-core classes run on CPU as oracles.

Product code never needs these (our router and dispatcher are device-agnostic). Stock Megatron
0.16.1 assumes CUDA in four places we touch (REFERENCE.md section 4):
    1. ``moe_utils.te_general_gemm`` is undefined without transformer-engine (NameError in the
       stock router's gating).
    2. ``torch.cuda.current_device()`` is used as an allocation device (router gating, buffers,
       ``_AllToAll`` outputs).
    3. ``MoEAlltoAllTokenDispatcher.__init__`` creates a ``torch.cuda.Stream``.
    4. Its ``_maybe_dtoh_and_synchronize`` uses CUDA streams; gloo also wants split sizes as lists.
Everything is scoped to a ``with megatron_cpu():`` block.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass


def _cpu_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """CPU stand-in for MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize: same moves, no
    streams, split sizes as Python lists (gloo's all_to_all_single rejects numpy arrays)."""

    def as_list(x):
        return None if x is None else x.tolist()

    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = as_list(self.input_splits)
        self.output_splits = as_list(self.output_splits)
        self.output_splits_tp = as_list(self.output_splits_tp)
    return tokens_per_expert


@contextlib.contextmanager
def megatron_cpu():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        stack.enter_context(mock.patch.object(torch.cuda, "Stream", _NoStream))
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        stack.enter_context(
            mock.patch.object(
                token_dispatcher.MoEAlltoAllTokenDispatcher,
                "_maybe_dtoh_and_synchronize",
                _cpu_dtoh_and_synchronize,
            )
        )
        yield


_GLOO_GROUPS = [False]  # whether the current parallel state has Megatron's gloo group copies


def init_parallel(ep: int = 1, tp: int = 1, etp: int = 1, gloo_groups: bool = False) -> None:
    """(Re)initialise Megatron's parallel state on the current gloo world with the given sizes.
    ``gloo_groups``: also Megatron's gloo copies of the data-parallel groups, which only its
    distributed optimizer needs (0.19 asks for them); off by default, since the world is gloo
    already and every group keeps threads alive."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        same = (
            ps.get_expert_model_parallel_world_size() == ep
            and ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_expert_tensor_parallel_world_size() == etp
            and _GLOO_GROUPS[0] == gloo_groups
        )
        if same:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=gloo_groups,
    )
    _GLOO_GROUPS[0] = gloo_groups


def moe_config(**overrides):
    """A small MoE TransformerConfig that runs on CPU (fp32, local spec, no TE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        add_bias_linear=False,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        bf16=False,
        params_dtype=torch.float32,
    )
    base.update(overrides)
    return TransformerConfig(**base)
