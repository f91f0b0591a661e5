"""The CPU job's checkpoint directories on disk: what counts as complete, what start-up removes,
which checkpoint ``--resume`` takes, and one-line errors for damaged or hostile files (the save
protocol itself runs on real gloo ranks in tests/distributed/test_cpu_checkpoint_save.py)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from megatron_c2r.cpu import checkpoint
from megatron_c2r.cpu.checkpoint import CheckpointError

SIZES = dict(world_size=2, num_experts=16, ep_size=2)


def write_checkpoint(out, iteration, *, marked=True, world=2):
    """The layout ``checkpoint.save`` writes, built with its own durable writers."""
    path = checkpoint.iter_dir(checkpoint.root_of(str(out)), iteration)
    os.makedirs(path, exist_ok=True)
    files = {}
    for rank in range(world):
        state = {"iteration": iteration, "model": {"w": torch.full((3,), float(rank))},
                 "optimizer": {"state": {}, "param_groups": []}, "torch_rng": torch.get_rng_state(),
                 "placements": []}
        files[f"rank{rank}.pt"] = checkpoint.write_torch(state, os.path.join(path, f"rank{rank}.pt"))
    if marked:
        meta = {"iteration": iteration, "world_size": world, "num_experts": 16, "ep_size": 2,
                "files": files}
        checkpoint.write_json(meta, os.path.join(path, checkpoint.META_FILE))
    return path


def test_resume_takes_the_newest_complete_checkpoint_and_start_up_removes_interrupted_saves(tmp_path):
    write_checkpoint(tmp_path, 3)
    write_checkpoint(tmp_path, 4)
    partial = write_checkpoint(tmp_path, 5, marked=False)  # killed before its marker
    open(os.path.join(partial, "rank1.pt.tmp"), "wb").write(b"\0" * 100)
    stray = os.path.join(checkpoint.root_of(str(tmp_path)), "iter_0000004", "meta.json.tmp")
    open(stray, "w").write("{")
    lines = []
    chosen = checkpoint.prepare(str(tmp_path), resume=True, log=lines.append, **SIZES)
    assert chosen.iteration == 4 and chosen.path.endswith("iter_0000004")
    assert not os.path.exists(partial) and not os.path.exists(stray)
    assert len(lines) == 1 and "removed 2 leftover" in lines[0] and "iter_0000005" in lines[0]
    for rank in (0, 1):
        assert checkpoint.load_rank_state(chosen, rank)["model"]["w"][0] == rank


def test_a_marked_set_whose_files_do_not_match_the_marker_is_skipped_with_one_line(tmp_path):
    write_checkpoint(tmp_path, 6)
    newer = write_checkpoint(tmp_path, 7)
    # rank 1 replaced by a file of another save (different size): a mixed set.
    torch.save({"iteration": 6, "pad": torch.zeros(100)}, os.path.join(newer, "rank1.pt"))
    lines = []
    chosen = checkpoint.prepare(str(tmp_path), resume=True, log=lines.append, **SIZES)
    assert chosen.iteration == 6
    assert len(lines) == 1 and "skipped" in lines[0] and "rank1.pt" in lines[0]
    assert "recorded" in lines[0] and "\n" not in lines[0]


def test_resume_refuses_with_one_line_when_nothing_complete_exists(tmp_path):
    with pytest.raises(CheckpointError, match=r"no complete checkpoint under .*run without --resume"):
        checkpoint.prepare(str(tmp_path), resume=True, **SIZES)
    write_checkpoint(tmp_path, 2, marked=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.prepare(str(tmp_path), resume=True, log=lambda m: None, **SIZES)
    assert os.listdir(checkpoint.root_of(str(tmp_path))) == []  # the partial one was removed


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"iteration": 9}'])
def test_a_garbage_marker_names_the_file_in_one_line(tmp_path, garbage):
    path = write_checkpoint(tmp_path, 9)
    with open(os.path.join(path, checkpoint.META_FILE), "wb") as f:
        f.write(garbage)
    with pytest.raises(CheckpointError) as info:
        checkpoint.prepare(str(tmp_path), resume=True, **SIZES)
    message = str(info.value)
    assert "iter_0000009/meta.json" in message and "run without --resume" in message
    assert "\n" not in message


def test_a_fresh_run_refuses_a_directory_holding_checkpoints(tmp_path):
    assert checkpoint.prepare(str(tmp_path), resume=False, **SIZES) is None
    write_checkpoint(tmp_path, 5)
    with pytest.raises(CheckpointError, match=r"iteration 5\): pass --resume .* new --out"):
        checkpoint.prepare(str(tmp_path), resume=False, **SIZES)


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path):
    write_checkpoint(tmp_path, 5)
    with pytest.raises(CheckpointError, match="num_experts=16 but this run has num_experts=8"):
        checkpoint.prepare(str(tmp_path), resume=True, **{**SIZES, "num_experts": 8})


class _Payload:
    def __reduce__(self):  # runs on an unsafe unpickle
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "malicious", "other_iteration"])
def test_a_damaged_or_hostile_rank_file_is_one_line_naming_it_never_torchs_message(
        tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    path = write_checkpoint(tmp_path, 4)
    rank_file = os.path.join(path, "rank1.pt")
    if damage == "truncated":
        data = open(rank_file, "rb").read()
        open(rank_file, "wb").write(data[: len(data) // 2])
    elif damage == "empty":
        open(rank_file, "wb").close()
    elif damage == "malicious":
        with open(rank_file, "wb") as f:
            torch.save({"iteration": 4, "model": _Payload()}, f, pickle_module=pickle)
    else:
        torch.save({"iteration": 3, "model": {}, "optimizer": {}, "torch_rng": torch.get_rng_state(),
                    "placements": []}, rank_file)
    ckpt = checkpoint.Checkpoint(path, 4, {})
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_rank_state(ckpt, 1)
    message = str(info.value)
    assert rank_file in message and "\n" not in message
    assert "weights_only" not in message and "run without --resume" in message
    assert not os.path.exists(tmp_path / "PWNED")
    if damage == "other_iteration":
        assert "mixed" in message


def test_prune_keeps_the_newest_complete_checkpoints_and_drops_everything_older(tmp_path):
    for it in (1, 2, 3):
        write_checkpoint(tmp_path, it)
    write_checkpoint(tmp_path, 4, marked=False)
    write_checkpoint(tmp_path, 5)
    checkpoint.prune(checkpoint.root_of(str(tmp_path)), keep=2)
    assert sorted(os.listdir(checkpoint.root_of(str(tmp_path)))) == ["iter_0000003", "iter_0000005"]


def test_markers_are_written_through_a_temp_file(tmp_path):
    path = tmp_path / "meta.json"
    checkpoint.write_json({"a": 1}, str(path))
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["meta.json"]


def _identity(**changes):
    from megatron_c2r.cpu.job_config import CPUTrainConfig, run_identity

    return run_identity(CPUTrainConfig(**changes))


def _mark_identity(path, identity):
    meta_path = os.path.join(path, checkpoint.META_FILE)
    meta = json.load(open(meta_path))
    checkpoint.write_json({**meta, "identity": identity}, meta_path)


@pytest.mark.parametrize("change, field", [
    (dict(topk=2), "megatron.--moe-router-topk 4 -> 2"),
    (dict(hidden_size=64), "megatron.--hidden-size 128 -> 64"),
    (dict(num_layers=2), "megatron.--num-layers 4 -> 2"),
    (dict(num_attention_heads=2), "megatron.--num-attention-heads 4 -> 2"),
    ("c2r", "c2r.max_groups 1 -> 2"),
    ("mode", "c2r.mode 'group' -> 'topk'"),
])
def test_resume_with_a_drifted_config_is_refused_naming_the_fields_and_the_fix(
        tmp_path, change, field):
    from megatron_c2r.moe.options import C2ROptions
    from megatron_c2r.routing.config import C2RRouterConfig

    group = dict(mode="group", max_groups=1, group_selection="anchored", warmup_steps=60)
    saved = _identity(c2r=C2ROptions(router=C2RRouterConfig(**group)))
    if change == "c2r":
        change = dict(c2r=C2ROptions(router=C2RRouterConfig(**{**group, "max_groups": 2})))
    elif change == "mode":
        change = dict(c2r=C2ROptions(router=C2RRouterConfig(mode="topk", warmup_steps=60)))
    else:
        change = dict(change, c2r=C2ROptions(router=C2RRouterConfig(**group)))
    _mark_identity(write_checkpoint(tmp_path, 5), saved)
    with pytest.raises(CheckpointError) as info:
        checkpoint.prepare(str(tmp_path), resume=True, identity=_identity(**change), **SIZES)
    message = str(info.value)
    assert field in message and "another --out" in message and "\n" not in message


def test_steps_intervals_and_logging_may_change_on_resume_but_not_below_the_checkpoint(tmp_path):
    _mark_identity(write_checkpoint(tmp_path, 5), _identity())
    changed = _identity(train_iters=900, log_interval=3, save_interval=2, eval_iters=1,
                        out_dir="elsewhere", plot=False, threads=2, progress=False)
    assert checkpoint.prepare(str(tmp_path), resume=True, identity=changed, train_iters=900,
                              **SIZES).iteration == 5
    with pytest.raises(CheckpointError, match=r"iteration 5 .* is 5: nothing left to train; pass "
                                              r"--steps N with N > 5"):
        checkpoint.prepare(str(tmp_path), resume=True, identity=changed, train_iters=5, **SIZES)


def test_a_checkpoint_from_before_identities_resumes_with_one_notice(tmp_path):
    write_checkpoint(tmp_path, 5)
    lines = []
    assert checkpoint.prepare(str(tmp_path), resume=True, identity=_identity(), log=lines.append,
                              **SIZES).iteration == 5
    assert len(lines) == 1 and "not checked" in lines[0]


def test_one_run_per_output_directory_the_second_is_refused_in_one_line(tmp_path):
    from megatron_c2r.cpu.trainer import OutDirLock

    with OutDirLock(str(tmp_path)):
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {os.getpid()} holds"):
            OutDirLock(str(tmp_path)).__enter__()
    with OutDirLock(str(tmp_path)):  # released when the holder ends
        pass
