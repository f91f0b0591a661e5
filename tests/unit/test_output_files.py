"""Output paths users point us at: symlinks are written through, special files refused, a full
disk is one line naming the path, and interrupted writes leave nothing behind."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

from megatron_c2r.cpu import checkpoint
from megatron_c2r.files import DiskFullError, output_target, write_text_atomic
from tests.unit.test_cli_estimate import small_config
from tests.unit.test_cli_errors import run_cli


def test_a_symlinked_output_writes_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_atomic(str(link), "new", prefix=".t-")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


@pytest.mark.parametrize("kind", ["fifo", "char_device", "directory", "link_to_fifo"])
def test_devices_fifos_and_directories_are_refused_in_one_line_and_left_alone(tmp_path, kind):
    path = {"fifo": tmp_path / "pipe", "char_device": "/dev/null", "directory": tmp_path,
            "link_to_fifo": tmp_path / "link"}[kind]
    if kind in ("fifo", "link_to_fifo"):
        os.mkfifo(tmp_path / "pipe")
    if kind == "link_to_fifo":
        (tmp_path / "link").symlink_to(tmp_path / "pipe")
    with pytest.raises((ValueError, IsADirectoryError)) as info:
        write_text_atomic(str(path), "x", prefix=".t-", what="--json")
    message = str(info.value)
    assert "\n" not in message and "--json=" in message
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    if kind in ("fifo", "link_to_fifo"):
        assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_estimate_json_to_a_fifo_is_refused_before_any_work(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    code, err, heavy, _ = run_cli("estimate", small_config(tmp_path), "--json", str(tmp_path / "pipe"))
    assert code == 2 and "is a FIFO" in err and len(err.strip().splitlines()) == 1
    assert output_target(str(tmp_path / "x.json"), "--json") == str(tmp_path / "x.json")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount; skipped with the reason where it cannot)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_previous_file(full_disk):
    out = full_disk / "estimate.json"
    write_text_atomic(str(out), "previous", prefix=".t-")
    with pytest.raises(DiskFullError) as info:
        write_text_atomic(str(out), "x" * (1 << 20), prefix=".t-")
    assert str(out) in str(info.value) and "ENOSPC" in str(info.value)
    assert "\n" not in str(info.value)
    assert out.read_text() == "previous" and os.listdir(full_disk) == ["estimate.json"]


def test_a_checkpoint_file_on_a_full_disk_is_one_line_and_leaves_no_temp_file(full_disk):
    with pytest.raises(DiskFullError, match="rank0.pt: no space left"):
        checkpoint.write_torch({"w": torch.zeros(1 << 16)}, str(full_disk / "rank0.pt"))
    assert os.listdir(full_disk) == []


def test_a_corpus_build_on_a_full_disk_is_one_line_and_a_later_start_removes_leftovers(
        full_disk, tmp_path):
    from megatron_c2r.cpu.data import build_corpus

    with pytest.raises(DiskFullError, match="no space left"):
        build_corpus(str(full_disk / "data"), 400_000)
    assert os.listdir(full_disk / "data") == []
    data = tmp_path / "data"  # an interrupted build (kill -9) leaves its temp files
    data.mkdir()
    for name in ("stdlib_bytes_0123.tmp77.bin", "stdlib_bytes_0123.tmp77.idx",
                 "stdlib_bytes_0123.json.tmp"):
        (data / name).write_bytes(b"partial")
    corpus = build_corpus(str(data), 20_000)
    assert sorted(os.listdir(data)) == sorted(
        os.path.basename(corpus.prefix) + ext for ext in (".bin", ".idx", ".json"))


def test_a_truncated_corpus_or_dataset_cache_is_rebuilt_with_one_line_not_a_traceback(
        tmp_path, capfd):
    import glob

    from megatron_c2r.cpu.data import build_corpus, build_datasets

    data = tmp_path / "data"
    corpus = build_corpus(str(data), 100_000)
    kwargs = dict(seq_length=32, train_samples=64, valid_samples=8, seed=1,
                  cache_dir=str(data / "cache"))
    first = build_datasets(corpus, **kwargs)[0][3]["tokens"]
    with open(corpus.prefix + ".bin", "r+b") as f:  # a copy cut short, a full disk
        f.truncate(1000)
    again = build_corpus(str(data), 100_000)
    assert os.path.getsize(again.prefix + ".bin") == 2 * again.num_tokens
    assert "is incomplete or truncated: rebuilding it" in capfd.readouterr().err
    for path in glob.glob(str(data / "cache" / "**" / "*.npy"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(10)
    rebuilt = build_datasets(again, **kwargs)[0][3]["tokens"]
    assert torch.equal(rebuilt, first)
    assert "dataset index cache" in capfd.readouterr().err
