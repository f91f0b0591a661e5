"""Files handed to `megatron-c2r plan` (and the top-T list / plan readers) fail in one line that
names the file, the problem and the fix, before anything is written; nothing in them is ever
unpickled or executed, and torch's / NumPy's "load it unsafely" hints never reach the user.
Size bounds are checked before a byte is parsed."""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from megatron_c2r.cli import main
from megatron_c2r.moe.lists import read_top_t_lists
from megatron_c2r import files as input_files
from megatron_c2r.placement.plan_file import read_plan
from megatron_c2r.placement.sources import load_collaboration

UNSAFE_HINTS = ("weights_only", "allow_pickle", "unsafe", "pickle.load", "Traceback")


class _Payload:
    """Unpickling this creates ``marker``: proof that a file was (not) executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _good_npy(path):
    counts = np.ones((4, 4))
    np.fill_diagonal(counts, 0)
    np.save(path, counts)


def _write(tmp_path, name: str):
    """Build the bad input ``name`` in tmp_path; returns (path, expected message part)."""
    path = str(tmp_path / name)
    marker = str(tmp_path / "EXECUTED")
    if name == "empty.npy" or name == "empty.pt":
        open(path, "wb").close()
        return path, "is empty (0 bytes)"
    if name == "truncated.npy":
        _good_npy(path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) - 40])
        return path, "truncated or damaged"
    if name == "truncated_header.npy":
        _good_npy(path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:30])
        return path, "damaged .npy header"
    if name == "truncated.pt":
        torch.save(torch.ones(4, 4), path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        return path, "truncated or damaged torch.save archive"
    if name == "garbage.npy":
        open(path, "wb").write(os.urandom(300))
        return path, "not a .npy file"
    if name == "garbage.pt":
        open(path, "wb").write(b"\x00\x01" + os.urandom(300))
        return path, "not a torch.save file"
    if name == "pickle.npy":
        pickle.dump(_Payload(marker), open(path, "wb"))
        return path, "not a .npy file"
    if name == "objects.npy":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return path, "holds dtype object"
    if name == "strings.npy":
        np.save(path, np.array([["a", "b"], ["c", "d"]]))
        return path, "holds dtype <U1"
    if name == "payload.pt":
        torch.save({"counts": _Payload(marker)}, path)
        return path, "holds pickled Python objects other than tensors"
    if name == "non_square.npy":
        np.save(path, np.ones((4, 5)))
        return path, "expected a square [E, E] matrix"
    if name == "non_square.pt":
        torch.save(torch.ones(3, 4, 5), path)
        return path, "expected a square [E, E] matrix"
    if name == "empty_array.npy":
        np.save(path, np.zeros((0, 4, 4)))
        return path, "is an empty array"
    if name == "bool.pt":
        torch.save(torch.ones(4, 4, dtype=torch.bool), path)
        return path, "torch.bool tensor"
    raise AssertionError(name)


BAD_INPUTS = ["empty.npy", "empty.pt", "truncated.npy", "truncated_header.npy", "truncated.pt",
              "garbage.npy", "garbage.pt", "pickle.npy", "objects.npy", "strings.npy",
              "payload.pt", "non_square.npy", "non_square.pt", "empty_array.npy", "bool.pt"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_plan_refuses_a_bad_collaboration_file_in_one_line_and_writes_nothing(tmp_path, capsys,
                                                                              name):
    path, expected = _write(tmp_path, name)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--collab", path, "--ep", "2", "--top-k", "2", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert expected in err and os.path.basename(path) in err, err
    assert not any(hint in err for hint in UNSAFE_HINTS), err
    assert not out.exists() and not (tmp_path / "EXECUTED").exists()
    assert sorted(os.listdir(tmp_path)) == [name]  # no temp files either


def test_the_loaders_raise_one_line_value_errors_naming_the_file(tmp_path):
    for name in ("pickle.npy", "payload.pt", "truncated.pt"):
        path, expected = _write(tmp_path, name)
        loader = input_files.load_npy if name.endswith(".npy") else input_files.load_torch_file
        with pytest.raises(ValueError, match=re.escape(expected)) as info:
            loader(path, "collaboration source")
        assert path in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "EXECUTED").exists()
    good = str(tmp_path / "good.npy")
    _good_npy(good)
    assert input_files.load_npy(good, "x").shape == (4, 4)


@pytest.mark.parametrize("name", ["empty.pt", "payload.pt", "garbage.npy", "objects.npy"])
def test_top_t_list_files_are_read_as_safely(tmp_path, name):
    path, expected = _write(tmp_path, name)
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        read_top_t_lists(path)
    assert "\n" not in str(info.value) and not (tmp_path / "EXECUTED").exists()


def test_json_plans_and_traces_are_size_checked_before_they_are_parsed(tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"num_experts": 4, "ep_size": 2, "top_k": 2, "layers": []}))
    assert read_plan(str(plan)).num_experts == 4
    monkeypatch.setattr(input_files, "MAX_JSON_BYTES", 16)
    monkeypatch.setattr(input_files.read_json_file, "__defaults__", (16,))
    with pytest.raises(ValueError, match=r"plan\.json' is 0 MiB, over the 0 MiB"):
        read_plan(str(plan))

    trace = tmp_path / "t.jsonl"
    record = {"layer": 0, "topk": 2, "top_indices": [[0, 1], [2, 3]]}
    trace.write_text(json.dumps(record) + "\n")
    assert len(load_collaboration(str(trace), num_experts=4)) == 1
    monkeypatch.setattr(input_files.bounded_lines, "__defaults__", (1 << 30, 20))
    with pytest.raises(ValueError, match=r"t\.jsonl:1 is longer than"):
        load_collaboration(str(trace), num_experts=4)
    monkeypatch.setattr(input_files.bounded_lines, "__defaults__", (10, 1 << 20))
    with pytest.raises(ValueError, match=r"t\.jsonl' is 0 MiB, over the 0 MiB"):
        load_collaboration(str(trace), num_experts=4)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"\xff\xfe not utf-8", "is not JSON"),
        (b"[1, 2]", "is a list: expected a JSON object"),
        (b'{"num_experts": [4], "ep_size": 2, "top_k": 2, "layers": []}', r"num_experts=\[4\]"),
        (b'{"num_experts": 4, "ep_size": 2, "top_k": 2, "layers": 3}', "layers is a int"),
        (b'{"num_experts": 4, "ep_size": 2, "top_k": 2, "layers": [{"layer": 0, "groups": '
         b'[[0, 1], [2, 3]], "expert_to_rank": [0, 0, 1, 1], "predicted_ranks_per_token": 5}]}',
         "predicted_ranks_per_token=5"),
        (b'{"num_experts": 4, "ep_size": 2, "top_k": 2, "layers": [{"layer": 0, "groups": '
         b'[[0, 1.5], [2, 3]], "expert_to_rank": [0, 0, 1, 1]}]}', "non-integer expert id"),
    ],
    ids=["not_utf8", "not_object", "bad_size", "layers_not_list", "bad_predictions", "float_id"],
)
def test_malformed_plans_are_refused_in_one_line_naming_the_field(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_plan(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"layer": 0, "topk": 2, "top_indices": [[0, 1], [2]]}', "not a routing-trace record"),
        ('{"layer": 0, "topk": 0, "top_indices": []}', "not a routing-trace record"),
        ('[1, 2, 3]', "not a routing-trace record"),
        ('{"layer": "x", "topk": 2, "top_indices": [[0, 1]]}', "not a routing-trace record"),
    ],
    ids=["ragged", "zero_topk", "not_object", "bad_layer"],
)
def test_malformed_trace_records_name_the_file_and_line(tmp_path, line, match):
    path = tmp_path / "t.jsonl"
    path.write_text('{"layer": 0, "topk": 2, "top_indices": [[0, 1]]}\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_collaboration(str(path), num_experts=4)
    assert "t.jsonl:2" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "obj,match",
    [
        ({"top_indices": 5}, "'top_indices' must be"),
        ({"top_indices": [torch.ones(4, 2)]}, "not an integer array"),
        ({"top_indices": []}, "holds no layers"),
        ({"layer.counts": [1, 2]}, "not a tracker count tensor"),
    ],
    ids=["scalar", "float_ids", "no_layers", "counts_not_tensor"],
)
def test_malformed_dumps_and_state_dicts_are_refused_in_one_line(tmp_path, obj, match):
    path = str(tmp_path / "d.pt")
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match) as info:
        load_collaboration(path, top_k=2)
    assert "\n" not in str(info.value)
