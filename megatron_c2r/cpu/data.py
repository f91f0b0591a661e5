"""The CPU main job's data: a real text corpus that exists offline on every machine.

Corpus: Python standard-library source files, one file = one document, taken in sorted path order
until ``max_bytes``. By default (``cpu.corpus: reference``) only the files that are byte-identical
in CPython 3.11, 3.12 and 3.13 (``corpus_files.REFERENCE_FILES``, 2.46 MB, each checked by its
SHA-256), so every supported Python trains on the same bytes; a reference file that is missing or
differs here is left out and the job says so in one line. Past the reference bytes, and with
``cpu.corpus: stdlib`` (the corpus of the runs in docs/quality.md), the rest comes from this
Python's own standard library, which differs between Python builds.
Tokenizer: bytes (ids 0..255) plus an end-of-document id; nothing is downloaded.

Storage and sampling are Megatron-core's own: documents are written once to an
``IndexedDataset`` (.bin/.idx, written to temporary names and renamed, so a killed job never
leaves a half-built dataset), and samples come from ``GPTDataset`` built by
``BlendedMegatronDatasetBuilder`` with a 95/5 train/validation document split. Sample order is a
function of the seed and sample index only, which is what makes ``--resume`` reproducible.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron_c2r.files import disk_full

EOD_ID = 256
PAD_ID = 257
VOCAB_SIZE = 258  # bytes + EOD + PAD
PADDED_VOCAB_SIZE = 264  # multiple of 8 for the embedding/output layer


CORPORA = ("reference", "stdlib")


def stdlib_files(max_bytes: int, root: Optional[str] = None) -> List[str]:
    """Sorted ``*.py`` paths of the standard library (tests and site-packages excluded), the
    shortest prefix of that order holding at least ``max_bytes`` (all files if fewer)."""
    root = root or sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    paths.sort(key=lambda p: os.path.relpath(p, root))
    chosen, total = [], 0
    for path in paths:
        if total >= max_bytes:
            break
        size = os.path.getsize(path)
        if size == 0:
            continue
        chosen.append(path)
        total += size
    if not chosen:
        raise FileNotFoundError(f"no *.py files under the standard library path {root!r}")
    return chosen


class ByteTokenizer:
    """Byte-level tokenizer with the attributes Megatron's datasets read (``eod``, ``pad``,
    ``vocab_size``, ``unique_identifiers`` for the dataset cache key). Duck-typed rather than a
    ``MegatronTokenizer`` subclass: that base class moved between 0.16 and 0.18."""

    eod = EOD_ID
    pad = PAD_ID
    vocab_size = VOCAB_SIZE
    unique_identifiers = {"class": "megatron_c2r.ByteTokenizer", "vocab_size": VOCAB_SIZE}

    def tokenize(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def corpus_files(max_bytes: int, corpus: str = "reference",
                 root: Optional[str] = None) -> Tuple[List[str], Optional[str]]:
    """(paths, note): the corpus's files in order, at least ``max_bytes`` of them where there are,
    and one line saying why this corpus differs from the reference one (None if it does not).

    ``reference``: ``REFERENCE_FILES`` whose SHA-256 matches, then (only if ``max_bytes`` asks for
    more) the other standard-library files in path order. ``stdlib``: ``stdlib_files``."""
    if corpus not in CORPORA:
        raise ValueError(f"cpu.corpus={corpus!r}: use one of {', '.join(CORPORA)}")
    if corpus == "stdlib":
        return stdlib_files(max_bytes, root), "cpu.corpus=stdlib: this Python's own files"
    from megatron_c2r.cpu.corpus_files import REFERENCE_FILES

    base = root or sysconfig.get_paths()["stdlib"]
    chosen, total, differ = [], 0, []
    for rel, sha, _size in REFERENCE_FILES:
        if total >= max_bytes:
            break
        path = os.path.join(base, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest()[:16] != sha:
            differ.append(rel)
            continue
        chosen.append(path)
        total += len(data)
    notes = []
    if differ:
        notes.append(f"{len(differ)} of the reference corpus files are missing or differ in this "
                     f"Python's standard library (first: {differ[0]}), so they are left out")
    if total < max_bytes:
        reference = {rel for rel, _sha, _size in REFERENCE_FILES}
        extra = [p for p in stdlib_files(1 << 62, base) if os.path.relpath(p, base) not in reference]
        for path in extra:
            if total >= max_bytes:
                break
            chosen.append(path)
            total += os.path.getsize(path)
        notes.append(f"cpu.corpus_bytes={max_bytes} is above the reference corpus, so the rest "
                     "comes from this Python's own standard library")
    if not chosen:
        raise FileNotFoundError(f"no reference corpus files under the standard library path {base!r}")
    note = None
    if notes:
        note = "corpus: " + "; ".join(notes) + ": losses will differ from the README's"
    return chosen, note


def remove_interrupted_builds(data_dir: str) -> List[str]:
    """Remove the temp files an interrupted corpus build leaves (``*.tmp<pid>.bin/.idx``,
    ``*.json.tmp``); only while no other run uses ``data_dir``. Returns the removed paths."""
    removed = []
    for name in os.listdir(data_dir) if os.path.isdir(data_dir) else ():
        if re.search(r"\.tmp\d*(\.bin|\.idx)?$", name):
            os.remove(os.path.join(data_dir, name))
            removed.append(os.path.join(data_dir, name))
    return removed


def _complete_build(prefix: str) -> Optional[dict]:
    """The build's metadata if ``prefix``.{json,idx,bin} are all there and the token file has the
    recorded size (uint16 ids), else None (missing, truncated or damaged: rebuild)."""
    try:
        with open(prefix + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        tokens = int(meta["num_tokens"])
        int(meta["num_documents"])
        ok = os.path.getsize(prefix + ".bin") == 2 * tokens and os.path.getsize(prefix + ".idx") > 0
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if ok else None


def corpus_fingerprint(files: List[str], base: str) -> str:
    """sha256 over (path relative to ``base``, bytes) of every document, first 16 hex digits:
    what the summary reports, and the dataset cache's key."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, base).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Corpus:
    prefix: str  # IndexedDataset path prefix (prefix.bin / prefix.idx)
    num_documents: int
    num_tokens: int
    fingerprint: str  # sha256 over (relative path, bytes) of every document
    note: Optional[str] = None  # why it differs from the reference corpus (corpus_files)


def build_corpus(data_dir: str, max_bytes: int, root: Optional[str] = None,
                 corpus: str = "reference") -> Corpus:
    """Write the byte corpus as a Megatron IndexedDataset under ``data_dir`` (reused when the
    same corpus is already there). Call on one rank; the others wait at a barrier."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    files, note = corpus_files(max_bytes, corpus, root)
    base = root or sysconfig.get_paths()["stdlib"]
    fingerprint = corpus_fingerprint(files, base)
    prefix = os.path.join(data_dir, f"stdlib_bytes_{fingerprint}")
    meta_path = prefix + ".json"
    meta = _complete_build(prefix)
    if meta is not None:
        return Corpus(prefix, meta["num_documents"], meta["num_tokens"], fingerprint, note)
    if any(os.path.exists(prefix + ext) for ext in (".bin", ".idx", ".json")):
        print(f"corpus cache {prefix}.* is incomplete or truncated: rebuilding it", file=sys.stderr)
        for ext in (".bin", ".idx", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + ext)

    os.makedirs(data_dir, exist_ok=True)
    remove_interrupted_builds(data_dir)  # the caller holds the output directory's lock
    tmp = f"{prefix}.tmp{os.getpid()}"
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.uint16)
        num_tokens = 0
        for path in files:
            with open(path, "rb") as f:
                ids = np.frombuffer(f.read(), dtype=np.uint8).astype(np.uint16)
            ids = np.append(ids, np.uint16(EOD_ID))
            builder.add_document(torch.from_numpy(ids.astype(np.int64)), [len(ids)])
            num_tokens += len(ids)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        meta = {"num_documents": len(files), "num_tokens": num_tokens, "fingerprint": fingerprint,
                "files": [os.path.relpath(p, base) for p in files]}
        with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    except OSError as exc:
        remove_interrupted_builds(data_dir)
        if exc.errno == errno.ENOSPC:
            raise disk_full(prefix + ".bin") from None
        raise
    return Corpus(prefix, len(files), num_tokens, fingerprint, note)


def build_datasets(corpus: Corpus, *, seq_length: int, train_samples: int, valid_samples: int,
                   seed: int, cache_dir: str):
    """(train, valid) ``GPTDataset``s over the corpus, split 95/5 by document."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([corpus.prefix], None),
        split="95,5,0",
        path_to_cache=cache_dir,
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    def build():
        return BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
        ).build()

    try:
        train, valid, _ = build()
    except (ValueError, EOFError, OSError) as exc:  # a truncated or damaged index cache
        if not os.path.isdir(cache_dir):
            raise
        print(f"dataset index cache {cache_dir} is unreadable ({type(exc).__name__}): rebuilding it",
              file=sys.stderr)
        shutil.rmtree(cache_dir)
        train, valid, _ = build()
    return train, valid
