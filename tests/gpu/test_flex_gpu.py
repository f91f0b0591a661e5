"""The flex invariant on CUDA (skipped without CUDA): our router's probs are > 0 exactly on its
routing map, and Megatron's own flex metadata (TP x EP fold, DeepEP / NCCL EP ``torch.topk``)
recovers the map, for every rule, score function, expert bias and capacity dropping, with the
router, its gating and Megatron's topk on the GPU (CUDA's topk breaks ties and rounds its own
way; the CPU test is tests/unit/test_flex_composition.py). The flex kernels themselves
(DeepEP, HybridEP, NCCL EP) need TP x EP > 1 GPUs and their packages, which the device check's
one-GPU machine lacks: they run in a cluster job (docs/transports.md), not here."""

import pytest

from tests.unit.test_flex_composition import RULE_CONFIGS, SCORES, check_flex_invariant

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("megatron_world1")]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("rule_key", RULE_CONFIGS, ids=lambda k: "/".join(filter(None, k)))
def test_flex_recovers_the_routing_map_on_cuda(rule_key, score):
    check_flex_invariant(rule_key, score, "cuda")

