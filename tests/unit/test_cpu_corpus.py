"""The CPU main job's corpus is the same bytes on every supported Python, and says why when not."""

import os
import shutil
import sysconfig

import pytest

from megatron_c2r.cpu.corpus_files import REFERENCE_FILES
from megatron_c2r.cpu.data import corpus_files, corpus_fingerprint

STDLIB = sysconfig.get_paths()["stdlib"]
# The default corpus (cpu.corpus_bytes 2,400,000 of the reference files), as CPython 3.11.7,
# 3.12.1 and 3.13.0 build it: the number every user's summary.json reports.
DEFAULT_FINGERPRINT = "516abaa725de40c1"


def test_the_default_corpus_has_the_same_fingerprint_on_this_python_as_on_every_supported_one():
    files, note = corpus_files(2_400_000)
    assert note is None
    assert len(files) == 286 and sum(os.path.getsize(p) for p in files) >= 2_400_000
    assert corpus_fingerprint(files, STDLIB) == DEFAULT_FINGERPRINT


def _copy_reference(root, count):
    for rel, _sha, _size in REFERENCE_FILES[:count]:
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(STDLIB, rel), os.path.join(root, rel))


def test_a_changed_or_missing_reference_file_is_left_out_and_named(tmp_path):
    _copy_reference(tmp_path, 6)
    changed = REFERENCE_FILES[1][0]
    with open(tmp_path / changed, "ab") as f:
        f.write(b"# patched\n")
    os.remove(tmp_path / REFERENCE_FILES[3][0])
    files, note = corpus_files(10_000_000, root=str(tmp_path))
    names = [os.path.relpath(p, tmp_path) for p in files]
    assert changed not in names and REFERENCE_FILES[3][0] not in names
    assert REFERENCE_FILES[0][0] in names and REFERENCE_FILES[5][0] in names
    assert f"first: {changed}" in note and "losses will differ from the README's" in note
    assert len(note.splitlines()) == 1


def test_bytes_beyond_the_reference_corpus_come_from_this_pythons_stdlib_and_say_so(tmp_path):
    _copy_reference(tmp_path, 2)
    (tmp_path / "zz_local.py").write_text("x = 1\n")
    files, note = corpus_files(10_000_000, root=str(tmp_path))
    assert os.path.relpath(files[-1], tmp_path) == "zz_local.py"
    assert "above the reference corpus" in note


def test_the_stdlib_corpus_is_the_old_prefix_and_an_unknown_corpus_is_refused():
    files, note = corpus_files(100_000, "stdlib")
    assert files and "cpu.corpus=stdlib" in note
    with pytest.raises(ValueError, match="cpu.corpus='books'"):
        corpus_files(100, "books")
