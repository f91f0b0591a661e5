"""Collaboration sources agree with each other, plan files round-trip and are validated, and
`megatron-c2r plan` writes a plan (with the C2R Top-T lists) or fails in one line, writing nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron_c2r.cli import main
from megatron_c2r.collaboration import CollaborationTracker, top_t_lists
from megatron_c2r.placement.plan_file import Plan, PlanLayer, plan_from_json, read_plan, write_plan
from megatron_c2r.placement.sources import LayerCollab, load_collaboration, synthetic_top_indices

E, K = 16, 4


@pytest.fixture(scope="module")
def tops():
    return [synthetic_top_indices(E, K, 600, 4, 1.5, seed=s) for s in range(2)]


def _write_trace(path, tops, ranks=1):
    """Megatron RouterTracer JSONL: one record per (step, layer), tokens split over rank files."""
    os.makedirs(path, exist_ok=True)
    for rank in range(ranks):
        with open(os.path.join(path, f"router_trace_rank{rank}.jsonl"), "w") as f:
            for layer, top in enumerate(tops):
                part = np.array_split(top, ranks)[rank]
                for step, chunk in enumerate(np.array_split(part, 2)):
                    f.write(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder",
                                        "layer": layer, "rank": rank, "num_tokens": len(chunk),
                                        "topk": K, "top_indices": chunk.tolist()}) + "\n")


def test_every_source_format_yields_the_same_counts_per_layer(tmp_path, tops):
    want = [LayerCollab.from_top_indices(t, E).counts_EE for t in tops]
    np.save(tmp_path / "m.npy", np.stack(want))
    torch.save(torch.tensor(np.stack(want)), tmp_path / "m.pt")
    torch.save({"top_indices": torch.tensor(np.stack(tops))}, tmp_path / "dump.pt")
    _write_trace(str(tmp_path / "traces"), tops, ranks=2)
    model = torch.nn.ModuleDict({f"l{i}": CollaborationTracker(E) for i in range(2)})
    for i, top in enumerate(tops):
        routing_map = torch.zeros(len(top), E, dtype=torch.bool)
        routing_map[torch.arange(len(top))[:, None], torch.from_numpy(top)] = True
        model[f"l{i}"].record(routing_map[:300])
        model[f"l{i}"].reduce_()
        model[f"l{i}"].record(routing_map[300:])  # still pending: counted too
    torch.save(model.state_dict(), tmp_path / "tracker.pt")

    sources = {
        "npy": load_collaboration(str(tmp_path / "m.npy"), top_k=K),
        "pt": load_collaboration(str(tmp_path / "m.pt"), top_k=K),
        "dump": load_collaboration(str(tmp_path / "dump.pt")),
        "trace_dir": load_collaboration(str(tmp_path / "traces"), num_experts=E),
        "trace_file": None,
        "tracker": load_collaboration(str(tmp_path / "tracker.pt"), top_k=K),
    }
    single = tmp_path / "one.jsonl"
    _write_trace(str(tmp_path / "t1"), tops)
    os.replace(tmp_path / "t1" / "router_trace_rank0.jsonl", single)
    sources["trace_file"] = load_collaboration(str(single), num_experts=E)
    for name, layers in sources.items():
        assert len(layers) == 2, name
        for layer, counts in zip(layers, want):
            np.testing.assert_array_equal(layer.counts_EE, counts, err_msg=name)
            assert layer.top_k == K
    assert sources["dump"][0].sets_UK is not None and sources["npy"][0].sets_UK is None


def test_padding_tokens_in_a_dump_are_not_counted(tmp_path, tops):
    pad = np.zeros(len(tops[0]), dtype=bool)
    pad[::3] = True
    torch.save({"top_indices": [torch.tensor(tops[0])], "padding_mask": torch.tensor(pad)},
               tmp_path / "d.pt")
    (layer,) = load_collaboration(str(tmp_path / "d.pt"), num_experts=E)
    np.testing.assert_array_equal(layer.counts_EE,
                                  LayerCollab.from_top_indices(tops[0][~pad], E).counts_EE)


@pytest.mark.parametrize(
    "matrix,match",
    [
        (np.ones((4, 5)), "expected a square"),
        (np.full((4, 4), np.nan), "NaN"),
        (-np.ones((4, 4)), "negative counts"),
        (np.triu(np.ones((4, 4)), 1), "not symmetric"),
    ],
    ids=["non_square", "nan", "negative", "triangular"],
)
def test_bad_matrices_are_refused_in_one_line(tmp_path, matrix, match):
    np.save(tmp_path / "bad.npy", matrix)
    with pytest.raises(ValueError, match=match) as info:
        load_collaboration(str(tmp_path / "bad.npy"), top_k=2)
    assert "\n" not in str(info.value)


def test_a_matrix_needs_top_k_and_a_missing_file_is_named(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((4, 4)))
    with pytest.raises(ValueError, match="pass --top-k"):
        load_collaboration(str(tmp_path / "m.npy"))
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_collaboration(str(tmp_path / "nope.npy"), top_k=2)


def _plan_json(groups, e2r=None):
    e2r = e2r or [g for e in range(4) for g, m in enumerate(groups) if e in m]
    return {"num_experts": 4, "ep_size": 2, "top_k": 2,
            "layers": [{"layer": 0, "groups": groups, "expert_to_rank": e2r}]}


def test_plan_files_round_trip_atomically_and_relabel_their_top_t_lists(tmp_path):
    layer = PlanLayer(0, [[1, 3], [0, 2]], [1, 0, 1, 0], {"identity": 2.0, "random": 2.0,
                      "planned": 1.5}, top_t_lists=[[2], [3], [0], [1]])
    plan = Plan(num_experts=4, ep_size=2, top_k=2, layers=[layer])
    write_plan(plan, str(tmp_path / "p.json"))
    assert os.listdir(tmp_path) == ["p.json"]  # no temp file left behind
    back = read_plan(str(tmp_path / "p.json"))
    assert back == plan and back.layers[0].order == [1, 3, 0, 2]
    # New ids: new 0 = old 1 (partner old 3 = new 1), new 2 = old 0 (partner old 2 = new 3).
    assert back.layers[0].top_t_lists_relabelled() == [[1], [0], [3], [2]]


@pytest.mark.parametrize(
    "obj,match",
    [
        (_plan_json([[0, 1], [1, 2]], [0, 0, 1, 1]), "not a partition"),
        (_plan_json([[0, 1, 2], [3]]), "expected 2 groups of 2"),
        (_plan_json([[0, 1], [2, 3]], [1, 1, 0, 0]), "disagrees with groups"),
        ({"num_experts": 4, "ep_size": 3, "top_k": 2, "layers": []}, "multiple of ep_size"),
        ({"ep_size": 2, "layers": []}, "no 'num_experts'"),
    ],
    ids=["overlap", "unbalanced", "e2r_mismatch", "e_not_divisible", "missing_field"],
)
def test_invalid_plans_are_refused_naming_the_field(obj, match):
    with pytest.raises(ValueError, match=match):
        plan_from_json(obj)


def test_a_plan_for_another_model_is_refused():
    plan = plan_from_json(_plan_json([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="num_experts=4 but the model has 8"):
        plan.check_matches(num_experts=8)
    with pytest.raises(ValueError, match="re-plan with --ep 4"):
        plan.check_matches(num_experts=4, ep_size=4)


def test_the_plan_command_writes_groups_table_and_paper_top_t_lists(tmp_path, tops, capsys):
    _write_trace(str(tmp_path / "traces"), tops)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--collab", str(tmp_path / "traces"), "--ep", "4", "--top-t", "5",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "identity" in table and "planned" in table and "exact" in table
    plan = read_plan(str(out))
    assert (plan.num_experts, plan.ep_size, plan.top_k, len(plan.layers)) == (E, 4, K, 2)
    for layer, top in zip(plan.layers, tops):
        counts = torch.from_numpy(LayerCollab.from_top_indices(top, E).counts_EE)
        assert layer.top_t_lists == top_t_lists(counts, 5).tolist()
        pred = layer.predicted_ranks_per_token
        assert pred["planned"] < pred["identity"] and pred["planned"] < pred["random"]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--ep", "3", "--top-k", "4"], "num_experts=16 must be divisible by --ep=3"),
        (["--ep", "4"], "pass --top-k"),
        (["--ep", "4", "--top-k", "4", "--top-t", "16"], "--top-t 16 must be in"),
    ],
    ids=["e_not_divisible_by_p", "missing_top_k", "top_t_too_large"],
)
def test_the_plan_command_fails_in_one_line_and_writes_nothing(tmp_path, tops, capsys, args,
                                                               match):
    np.save(tmp_path / "m.npy", LayerCollab.from_top_indices(tops[0], E).counts_EE)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--collab", str(tmp_path / "m.npy"), "--out", str(out), "--no-progress",
               *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1
    assert not out.exists()
