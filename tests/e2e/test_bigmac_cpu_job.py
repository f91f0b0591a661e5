"""BigMac in the CPU main job: `megatron-c2r train --set c2r.dispatch_dim=...` trains 2 gloo ranks
through the warm-up, the in-run re-placement and anchored routing, checkpoints the projections and
the d-wide experts, and resumes to the same losses bit for bit."""

import json
import os

import torch

from tests.e2e.test_cpu_main_job import history, train

BIGMAC = ["--set", "c2r.dispatch_dim=32", "--set", "c2r.dispatch_ffn_hidden_size=64"]


def test_bigmac_trains_checkpoints_and_resumes_to_the_same_losses(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full, "--steps", "8", *BIGMAC)
    summary = json.load(open(full / "summary.json"))
    assert summary["iterations"] == 8 and summary["ranks_per_token"] == 1.0
    state = torch.load(full / "checkpoint" / "iter_0000008" / "rank1.pt", weights_only=True)
    model = state["model"]
    prefix = "decoder.layers.1.mlp."
    assert model[prefix + "dispatch_down.weight"].shape == (32, 64)  # [d, H]
    assert model[prefix + "dispatch_up.weight"].shape == (64, 32)
    # SwiGLU experts at width d: fc1 [2F, d]
    assert model[prefix + "experts.local_experts.0.linear_fc1.weight"].shape == (128, 32)

    train(resumed, "--steps", "8", "--exit-after", "5", *BIGMAC)
    train(resumed, "--steps", "8", "--resume", *BIGMAC)
    losses = history(full)
    assert history(resumed) == losses and len(losses) == 8  # bit for bit, every iteration
    assert torch.isfinite(torch.tensor(list(losses.values()))).all()
    assert json.load(open(resumed / "summary.json"))["resumed_at"] == [5]
    assert os.path.exists(resumed / "checkpoint" / "iter_0000008" / "meta.json")
