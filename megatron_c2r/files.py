"""Files users hand us (placement inputs, traces, plans): read with bounded size, nothing
executed, and every problem reported in one line naming the file, the problem and the fix
(before anything is written); and our own outputs (plans, estimate JSON), written atomically.

    read_json_file(path, what)        JSON (plans): size checked before reading
    bounded_lines(path, what)         JSON-lines (routing traces): total and per-line bounds
    load_npy(path, what)              NumPy .npy: numeric arrays only (no pickle, no objects)
    load_torch_file(path, what)       torch.save files: torch.load(weights_only=True), mmap'ed
                                      when the file allows it, so a large model state dict is
                                      not read into memory whole
    write_text_atomic(path, text, prefix)  an output file (plan, estimate JSON): temp file in
                                      the same directory + rename, a normal file's mode

Torch's and NumPy's own messages for refused pickles suggest loading the file unsafely; they are
never shown (each error here is ours, ``from None``).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import tempfile
import zipfile
from typing import Any, Iterator

import numpy as np

# A plan for E=256 with 255-long top-T lists is ~0.3 MB per layer (~20 MB for 61 layers).
MAX_JSON_BYTES = 256 << 20
# Routing traces hold every token's top-k ids (~4 bytes of JSON per id, 8 in memory).
MAX_TRACE_BYTES = 8 << 30
MAX_TRACE_LINE_BYTES = 512 << 20

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
_ZIP_MAGIC = b"PK\x03\x04"


def check_file(path: str, what: str, max_bytes: int) -> int:
    """The file's size; FileNotFoundError / ValueError (one line) if missing, not a regular
    file, empty or larger than ``max_bytes``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes): pass the file the tool wrote")
    if size > max_bytes:
        raise ValueError(f"{what} {path!r} is {size / 2**20:.0f} MiB, over the {max_bytes >> 20} "
                         "MiB this reader accepts: pass the file the tool wrote (or split it)")
    return size


def read_json_file(path: str, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON of a bounded-size file."""
    check_file(path, what, max_bytes)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        decode = isinstance(exc, json.JSONDecodeError)
        where = f" ({exc.msg} at line {exc.lineno})" if decode else ""
        raise ValueError(f"{what} {path!r} is not JSON{where}: pass the file the tool wrote"
                         ) from None


def output_target(path: str, what: str) -> str:
    """The file an output named ``path`` really is: a symlink's final target (written there,
    the link kept), or ``path``. IsADirectoryError / ValueError (one line naming ``what``) for a
    directory, a device, a FIFO or a socket: an atomic replace would swap them for a regular
    file (``--out /dev/null`` as root would replace the device)."""
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"{what}={path!r} is a directory: name the file to write")
    if os.path.lexists(target):
        mode = os.stat(target).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a character device" if stat.S_ISCHR(mode) else "a block device"
                    if stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
                    if stat.S_ISSOCK(mode) else "not a regular file")
            raise ValueError(f"{what}={path!r} is {kind}: name a regular file (it would be "
                             "replaced, not written to)")
    return target


def write_text_atomic(path: str, text: str, prefix: str, what: str = "output") -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file ``<prefix>*.json.tmp`` in the same
    directory + ``os.replace``: readers never see a half-written file, and a failure leaves any
    previous file untouched (the temp file is removed). A symlink is followed (its target is
    replaced, the link stays); anything but a regular file is refused (``output_target``). A full
    disk is one line naming the path (``OSError`` ENOSPC, re-raised as ``disk_full``)."""
    path = output_target(path, what)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; an output is a normal file
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise


class DiskFullError(ValueError):
    """ENOSPC while writing an output: one line naming the path (a user error: free space)."""


def disk_full(path: str) -> DiskFullError:
    return DiskFullError(f"{path}: no space left on the device (ENOSPC) while writing it: free "
                         "space or write elsewhere; nothing was replaced")


def bounded_lines(paths: list[str], what: str, max_total: int = MAX_TRACE_BYTES,
                  max_line: int = MAX_TRACE_LINE_BYTES) -> Iterator[tuple[str, int, str]]:
    """(path, line number, text) for every line of ``paths``, refusing (one line, before any
    line is yielded) files that together exceed ``max_total`` bytes, and any line over
    ``max_line`` bytes when it is reached."""
    total = 0
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist")
        total += os.path.getsize(path)
    if total > max_total:
        raise ValueError(f"{what} {paths[0]!r}{' (and others)' if len(paths) > 1 else ''} is "
                         f"{total / 2**20:.0f} MiB, over the {max_total >> 20} MiB this reader "
                         "accepts: trace fewer steps (or pass a co-activation matrix)")
    for path in paths:
        with open(path, "rb") as f:
            lineno = 0
            while True:
                raw = f.readline(max_line + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > max_line:
                    raise ValueError(f"{path}:{lineno} is longer than {max_line >> 20} MiB: not "
                                     "a routing-trace record")
                try:
                    yield path, lineno, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{lineno} is not UTF-8 text: not a routing-trace "
                                     "record") from None


def load_npy(path: str, what: str, max_bytes: int = 16 << 30) -> np.ndarray:
    """A numeric array from a .npy file (np.load(allow_pickle=False); object and structured
    arrays, pickles and damaged files refused in one line)."""
    check_file(path, what, max_bytes)
    fix = "save the numbers with numpy.save(path, array)"
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise ValueError(f"{what} {path!r} is not a .npy file (no NumPy header; a pickle or "
                             f"another format): {fix}")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = _NPY_HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f"{what} {path!r} is a .npy file of format version {version}: "
                                 f"{fix} (format 1.0 or 2.0)")
            shape, _, dtype = read_header(f)
        except (EOFError, SyntaxError, OSError, ValueError) as exc:
            if str(exc).startswith(what):
                raise

            raise ValueError(f"{what} {path!r} has a damaged .npy header (truncated?): {fix}"
                             ) from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise ValueError(f"{what} {path!r} holds dtype {dtype} (shape {tuple(shape)}), not "
                         f"numbers (object arrays are never unpickled): {fix}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError):
        raise ValueError(f"{what} {path!r} is truncated or damaged (shape {tuple(shape)} "
                         f"announced, fewer bytes stored): {fix}") from None


def load_torch_file(path: str, what: str, max_bytes: int = 1 << 40) -> Any:
    """torch.load(weights_only=True) of a torch.save file, memory-mapped when it is a zip
    archive (torch's default format). Damaged files and pickles holding anything but tensors
    and plain containers are refused in one line."""
    import torch  # heavy; the CLI imports this module before it needs torch

    check_file(path, what, max_bytes)
    with open(path, "rb") as f:
        is_zip = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path!r} is a truncated or damaged torch.save archive: save "
                         "it again with torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        if is_zip:  # a well-formed archive whose pickle names something beyond tensors
            raise ValueError(f"{what} {path!r} holds pickled Python objects other than tensors, "
                             "dicts, lists and numbers, which are never loaded: save plain "
                             "tensors with torch.save") from None
        raise ValueError(f"{what} {path!r} is not a torch.save file (damaged, another format, "
                         "or a pickle, which is never loaded): save tensors with torch.save"
                         ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        raise ValueError(f"{what} {path!r} is not a readable torch.save file (truncated, "
                         "damaged or another format): save it again with torch.save") from None
