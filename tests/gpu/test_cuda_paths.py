"""GPU-only checks (skipped without CUDA): the pure routing and row-building paths produce the
same selection on CUDA as on CPU, and allocate on the input's device."""

import pytest
import torch

from megatron_c2r.comm.rows import build_send_rows
from megatron_c2r.routing.functional import c2r_topk, group_topk

pytestmark = pytest.mark.gpu


def test_routing_rules_select_the_same_experts_on_cuda_as_on_cpu():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4096, 64, generator=gen)
    lists = torch.stack([torch.roll(torch.arange(64), -e)[1:16] for e in range(64)])
    groups = torch.arange(64) // 8
    for fn in (lambda s, l, g: c2r_topk(s, 8, l), lambda s, l, g: group_topk(s, 8, g, 8, 2)):
        v_cpu, i_cpu = fn(scores, lists, groups)
        v_gpu, i_gpu = fn(scores.cuda(), lists.cuda(), groups.cuda())
        assert i_gpu.device.type == "cuda"
        assert torch.equal(i_cpu, i_gpu.cpu())
        torch.testing.assert_close(v_cpu, v_gpu.cpu())


def test_send_rows_are_built_on_the_input_device():
    idx = torch.stack([torch.randperm(16)[:4] for _ in range(256)]).cuda()
    routing_map = torch.zeros(256, 16, dtype=torch.bool, device="cuda").scatter_(1, idx, True)
    probs = torch.rand(256, 16, device="cuda") * routing_map
    send = build_send_rows(routing_map, probs, 4, 4)
    assert send.meta_RM.device.type == "cuda" and send.token_idx_R.device.type == "cuda"


def test_flat_dedup_layer_stays_within_the_sync_budget_on_cuda(tmp_path):
    """The device check's sync audit (docs/device_check.md) as a test: at most one host sync per
    C2RMoELayer forward, none in backward (a subprocess: it owns its NCCL world of one)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        ["bash", os.path.join(root, "tests", "gpu", "device_check.sh"), "--out", str(tmp_path),
         "--skip", "speed_memory", "entry_arguments", "entry_path"],
        capture_output=True, text=True, cwd=root, timeout=300,
        env=dict(os.environ, PYTHON=sys.executable),
    )  # fmt: skip
    audit = json.loads((tmp_path / "device_check.json").read_text())["checks"]["sync_audit"]
    assert audit["status"] == "pass", (audit.get("layers"), result.stdout[-2000:])


@pytest.mark.parametrize("case", ["random", "own_node", "last_node"])
@pytest.mark.parametrize("P,G,E,k", [(4, 2, 8, 2), (8, 4, 16, 4), (8, 2, 16, 3)],
                         ids=["P4-2x2", "P8-2x4", "P8-4x2"])  # fmt: skip
def test_two_level_and_flat_row_paths_on_cuda_with_empty_ranks_and_no_tokens(P, G, E, k, case):
    """The row functions and the two-level path at P = 4 and 8 on CUDA with the reference
    all-to-all, a rank with T = 0 and nodes that receive nothing (CPU twin in tests/unit)."""
    from tests.unit.test_two_level_rows import check_simulated_paths

    check_simulated_paths(P, G, E, k, case, "cuda")
