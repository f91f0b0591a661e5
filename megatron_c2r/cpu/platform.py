"""What Megatron-core's CUDA assumptions need on CPU, in one place, used only by the CPU runner.

Megatron 0.16.1's attention path assumes CUDA three times: ``DotProductAttention`` takes its
score buffer from ``GlobalMemoryBuffer`` (allocated on ``torch.cuda.current_device()``), forks
the model-parallel CUDA RNG tracker around attention dropout, and, when no mask is passed, builds
the causal mask on ``"cuda"``. RoPE also moves its frequencies to CUDA (the CPU config uses
learned absolute positions instead).

We go through Megatron's seams rather than patching it:

1. ``cpu_block_spec`` swaps each layer spec's ``core_attention`` for ``CPUCoreAttention`` (a
   ``DotProductAttention`` subclass computing causal attention with
   ``torch.nn.functional.scaled_dot_product_attention`` on the input's device; no buffer, no
   RNG fork, the mask built from ``attn_mask_type``).
2. ``setup_cpu_megatron`` installs Megatron's ``inference_rng_tracker`` (its ``fork()`` is a
   no-op). The CPU runner trains with dropout 0, so no dropout RNG stream needs tracking.

Model configs for CPU use ``use_cpu_initialization=True``, local (non transformer-engine) specs
and ``position_embedding_type='learned_absolute'``.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_c2r import compat


def setup_cpu_megatron(seed: int) -> None:
    """Seed torch and install the no-op RNG tracker (once per process, after
    ``initialize_model_parallel``)."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


class CPUCoreAttention(DotProductAttention):
    """Causal/no-mask softmax attention on any device (dropout must be 0).

    Shapes: query [Sq, B, Nh, Dh], key/value [Sk, B, Ng, Dh] (Ng query groups; repeated to Nh)
    -> output [Sq, B, Nh*Dh], like ``DotProductAttention``.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("CPUCoreAttention supports neither packed sequences nor attention bias")
        if self.config.attention_dropout:
            raise ValueError(
                f"attention_dropout={self.config.attention_dropout}: the CPU runner needs 0"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        heads = query.shape[2]
        if key.shape[2] != heads:  # grouped-query attention
            key = key.repeat_interleave(heads // key.shape[2], dim=2)
            value = value.repeat_interleave(heads // value.shape[2], dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, Nh, S, Dh]
        if mask_type == AttnMaskType.causal:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = None if attention_mask is None else ~attention_mask  # Megatron: True = masked
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [Sq, B, Nh*Dh]


def cpu_layer_spec(layer_spec):
    """A transformer layer spec whose self-attention uses ``CPUCoreAttention``."""
    layer_sub = compat.layer_submodules(layer_spec)
    attn = layer_sub.self_attention
    attn = dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=CPUCoreAttention)
    )
    return compat.replace_layer_submodules(layer_spec, self_attention=attn)


def cpu_block_spec(block_spec):
    """``cpu_layer_spec`` applied to every layer of a ``TransformerBlockSubmodules``."""
    return dataclasses.replace(
        block_spec, layer_specs=[cpu_layer_spec(s) for s in block_spec.layer_specs]
    )
