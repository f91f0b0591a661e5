"""Construction-time checks of the dedup dispatcher: contiguous local experts, and CUDA graphs
that would capture our MoE layer are refused in one line (issue 16 part 2).

Megatron's default ``cuda_graph_scope`` ("full", turned into ``[]`` = the whole layer) passed the
old check, and capture would then fail on the dispatcher's data-dependent split sizes. Real
``TransformerConfig`` objects built with the 0.16-0.18 field names (0.19+ accepts them and
migrates them in ``__post_init__``: ``cuda_graph_scope`` -> ``cuda_graph_modules``, scope
``full_iteration`` -> ``cuda_graph_impl='full_iteration'``; the message names the field the
installed config has); plain objects with the 0.19+ field names (``cuda_graph_modules``,
``inference_cuda_graph_scope``), which a 0.16 config cannot express.
"""

import enum
from types import SimpleNamespace

import pytest

from megatron_c2r.compat import moe_cuda_graph_capture
from megatron_c2r.moe.dispatcher import check_local_experts, validate_dedup_config
from tests.megatron_cpu import moe_config

# The scope field of the installed TransformerConfig (0.19+ renamed it; the old name migrates).
SCOPE = "cuda_graph_modules" if hasattr(moe_config(), "cuda_graph_modules") else "cuda_graph_scope"
REFUSED_0_16 = [
    (dict(cuda_graph_impl="local"), f"{SCOPE}=[] (the whole layer)"),  # default "full"
    (dict(cuda_graph_impl="transformer_engine"), f"{SCOPE}=[] (the whole layer)"),
    (dict(enable_cuda_graph=True), f"cuda_graph_impl='local' with {SCOPE}=[]"),
    (dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"),
     "['full_iteration']" if SCOPE == "cuda_graph_scope" else "cuda_graph_impl='full_iteration'"),
    (dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe_router"), "['moe_router']"),
    (
        dict(
            cuda_graph_impl="transformer_engine", cuda_graph_scope="attn,moe_router,moe_preprocess"
        ),
        "['moe_router', 'moe_preprocess']",
    ),
]


@pytest.mark.parametrize("fields,shown", REFUSED_0_16, ids=[str(f) for f, _ in REFUSED_0_16])
def test_every_0_16_scope_that_captures_the_moe_layer_is_refused_naming_the_flag(fields, shown):
    config = moe_config(**fields)
    graphed = moe_cuda_graph_capture(config)
    assert graphed is not None and shown in graphed
    with pytest.raises(ValueError) as err:
        validate_dedup_config(config, ep_size=1, expert_tp_size=1)
    message = str(err.value)
    assert message.startswith(graphed) and "cuda_graph_impl='none'" in message
    assert "\n" not in message


def test_the_moe_scope_is_seen_too_though_its_pad_to_capacity_is_refused_first():
    # Megatron allows scope "moe" only with drop-and-pad, which the dedup dispatcher refuses.
    config = moe_config(
        cuda_graph_impl="transformer_engine",
        cuda_graph_scope="moe",
        moe_expert_capacity_factor=1.0,
        moe_pad_expert_input_to_capacity=True,
    )
    assert f"{SCOPE}=['moe']" in moe_cuda_graph_capture(config)
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity=True"):
        validate_dedup_config(config, ep_size=1, expert_tp_size=1)


@pytest.mark.parametrize(
    "fields",
    [dict(), dict(cuda_graph_impl="local", cuda_graph_scope="attn"),
     dict(cuda_graph_impl="transformer_engine", cuda_graph_scope=["attn"])],
    ids=["no graphs", "local attn", "te attn"],
)
def test_graphs_that_leave_the_moe_layer_eager_are_accepted(fields):
    config = moe_config(**fields)
    assert moe_cuda_graph_capture(config) is None
    validate_dedup_config(config, ep_size=1, expert_tp_size=1)


class CudaGraphModule(enum.Enum):  # 0.19+'s enum, by name (this wheel does not have it)
    attn = 1
    mlp = 2
    moe = 3
    moe_router = 4
    moe_preprocess = 5
    mamba = 6


class InferenceCudaGraphScope(enum.Enum):
    none = 1
    layer = 2
    block = 3


def config_0_19(**fields):
    base = dict(cuda_graph_impl="local", cuda_graph_modules=[CudaGraphModule.attn],
                inference_cuda_graph_scope=None)
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize(
    "fields,shown",
    [
        (dict(cuda_graph_impl="full_iteration", cuda_graph_modules=[]),
         "cuda_graph_impl='full_iteration'"),
        (dict(cuda_graph_modules=[]), "cuda_graph_modules=[] (the whole layer)"),
        (dict(cuda_graph_modules="full"), "cuda_graph_modules=[] (the whole layer)"),
        (dict(cuda_graph_modules=[CudaGraphModule.attn, CudaGraphModule.moe_router]),
         "cuda_graph_modules=['moe_router']"),
        (dict(inference_cuda_graph_scope=InferenceCudaGraphScope.block),
         "inference_cuda_graph_scope=block"),
    ],
)
def test_the_0_19_field_names_are_read_too(fields, shown):
    assert shown in moe_cuda_graph_capture(config_0_19(**fields))


def test_0_19_graphs_of_attention_only_are_accepted():
    assert moe_cuda_graph_capture(config_0_19()) is None
    eager = config_0_19(cuda_graph_impl="none", cuda_graph_modules=[])
    assert moe_cuda_graph_capture(eager) is None


def test_local_experts_must_be_the_ranks_contiguous_block():
    check_local_experts([2, 3], 2, 8, ep_rank=1, ep_size=4)
    for indices, local, experts in [([2, 4], 2, 8), ([0, 1], 2, 8), ([2, 3], 2, 6)]:
        with pytest.raises(ValueError, match=r"must be the contiguous block 2\.\.3 of EP rank 1"):
            check_local_experts(indices, local, experts, ep_rank=1, ep_size=4)
