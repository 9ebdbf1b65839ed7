"""Open HDF5 files so that damage is an error at once, never a hang or silent zeros.

Three facts about HDF5, measured on the project's machines, shape this module:

- a reader in SWMR mode retries a metadata block whose checksum fails (a live writer may be
  rewriting it), by default 100 times with a doubling back-off: on a damaged file one open
  took hours. Plain read-only opens fail at once with "incorrect metadata checksum";
- a plain read-only open refuses a file whose writer is alive or died (its consistency flag is
  set); only SWMR opens those;
- a SWMR open skips HDF5's end-of-file check, so a truncated file would read zeros.

So :func:`open_readonly` reads the superblock itself first (signature, size, flags, the
end-of-file it records), opens cleanly-closed files plainly, and opens flagged files (live or
crashed writers) in SWMR mode with a bounded number of metadata read attempts.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import h5py

from ..errors import RunFileError
from . import format as fmt

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SWMR_READ_ATTEMPTS = 20  # about 0.1 s of back-off in all: plenty for a live writer's flush


def _damaged(path: Path, what: str) -> RunFileError:
    return RunFileError(f"{path} {what}. Re-record it or restore a copy.")


def has_signature(path: str | os.PathLike) -> bool:
    """Whether the file starts with HDF5's signature (no HDF5 call: it cannot hang)."""
    with open(path, "rb") as fh:
        return fh.read(8) == HDF5_SIGNATURE


def superblock(path: Path) -> tuple[int, int, int] | None:
    """``(version, consistency flags, recorded end of file)`` of a version-2+ superblock at the
    start of the file (what the writer makes), or None for any other.

    Raises:
        RunFileError: the file is shorter than a superblock, or than the end-of-file it records.
    """
    with open(path, "rb") as fh:
        head = fh.read(48)
    if head[:8] != HDF5_SIGNATURE:
        return None  # a superblock after a user block, or none: HDF5 itself decides
    if len(head) < 12:
        raise _damaged(
            path, f"is truncated or corrupt: {len(head)} bytes, shorter than an HDF5 header"
        )
    version = head[8]
    if version < 2:
        return None
    size = head[9]  # bytes per offset: base address, extension address, end-of-file address
    need = 12 + 4 * size + 4
    if size not in (2, 4, 8) or len(head) < min(need, 48):
        raise _damaged(
            path, f"is truncated or corrupt: {len(head)} bytes, shorter than its HDF5 superblock"
        )
    base = int.from_bytes(head[12 : 12 + size], "little")
    eof = int.from_bytes(head[12 + 2 * size : 12 + 3 * size], "little")
    if os.path.getsize(path) < base + eof:
        raise _damaged(
            path,
            f"is shorter ({os.path.getsize(path)} bytes) than its HDF5 header records "
            f"({base + eof} bytes): it is truncated or corrupt (an interrupted copy?)",
        )
    return version, head[11], base + eof


def writer_flagged(path: str | os.PathLike) -> bool:
    """Whether the superblock says a writer has the file open (or died holding it open)."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    return len(head) == 12 and head[:8] == HDF5_SIGNATURE and head[8] >= 2 and head[11] != 0


@lru_cache(maxsize=1)
def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library h5py runs on, for the one setting h5py does not wrap."""
    candidates = glob.glob(os.path.join(os.path.dirname(h5py.__file__) + ".libs", "libhdf5-*"))
    candidates = [c for c in candidates if "_hl" not in os.path.basename(c)]
    try:  # h5py built against a system HDF5: find the mapped library
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.rsplit(None, 1)[-1]
                base = os.path.basename(name)
                if base.startswith("libhdf5") and "_hl" not in base and name not in candidates:
                    candidates.append(name)
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _open_swmr(path: Path) -> h5py.File:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    lib = _hdf5_library()
    if lib is not None:
        lib.H5Pset_metadata_read_attempts(fapl.id, SWMR_READ_ATTEMPTS)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl)
    return h5py.File(fid)


def open_readonly(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only, failing fast on damage (see the module docstring).

    Raises:
        RunFileError: truncated, not HDF5, or corrupt; the message names the path.
    """
    path = Path(path)
    info = superblock(path)
    flagged = info is not None and info[1] != 0
    error: OSError | None = None
    if not flagged:
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            error = exc
            if "already open for write" not in str(exc):  # a writer started meanwhile
                raise _damaged(
                    path, f"is an HDF5 file that cannot be opened ({exc}); it is corrupt"
                ) from None
    try:
        return _open_swmr(path)
    except (OSError, KeyError, RuntimeError) as exc:
        raise _damaged(
            path, f"is an HDF5 file that cannot be opened ({error or exc}); it is corrupt"
        ) from None


LIVE_READ_ATTEMPTS = 25  # x 10 ms: a live writer rewrites a table chunk in well under that


def retrying(read, live: bool):
    """``read()``, retried for a while when the file is live (SWMR): a reader can meet a table
    chunk (``/snapshots``, metrics, events) while the writer rewrites it in place, which fails
    its checksum once; damage fails every time. Raises the last error."""
    import time

    attempts = LIVE_READ_ATTEMPTS if live else 1
    for attempt in range(attempts):
        try:
            return read()
        except (OSError, RuntimeError, ValueError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


DIGEST_ATTR = "metadata_sha256"  # an attribute of /layers (the root's stay few and compact)


def stored_digest(f: h5py.File) -> str | None:
    """The digest the writer stored on ``/layers``, or None."""
    group = f.get("layers")
    value = group.attrs.get(DIGEST_ATTR) if isinstance(group, h5py.Group) else None
    return value.decode() if isinstance(value, bytes) else value


def write_digest(f: h5py.File) -> None:
    f["layers"].attrs[DIGEST_ATTR] = metadata_digest(f)


def _canonical(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


def metadata_digest(f: h5py.File) -> str:
    """SHA-256 of a run's names and attributes: the root attributes, each layer's stored name
    and attributes, in order (format 1.2), and since format 1.3 the names and attributes of
    ``/state`` and its members (``null`` when the run has no ``/state``).

    HDF5 checksums object headers, but attributes and link names that spill into a fractal heap
    are not checksummed: a flipped byte there renamed a parameter silently. This digest, written
    once at creation (those never change after it), makes such damage an error. It is kept on
    ``/layers``: a ninth root attribute moved the root's attributes into a fractal heap, where
    HDF5 looped forever on one damaged file.
    """
    root = {k: _canonical(v) for k, v in sorted(f.attrs.items())}
    group = f.get("layers")
    layers = [
        [name, {k: _canonical(v) for k, v in sorted(group[name].attrs.items())}]
        for name in (group if isinstance(group, h5py.Group) else ())
    ]
    doc: dict[str, object] = {"root": root, "layers": layers}
    if fmt.at_least(_canonical(f.attrs.get("format_version", "")), fmt.STATE_SINCE):
        doc["state"] = _group_digest(f.get("state"))
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _group_digest(group: object) -> object:
    """A group's attributes and each member's name and attributes, in order (None: absent)."""
    if group is None:
        return None
    if not isinstance(group, h5py.Group):
        return f"not a group: {type(group).__name__}"
    members = []
    for name in group:
        link = group.get(name, getlink=True)
        obj = group.get(name) if isinstance(link, h5py.HardLink) else None
        attrs = {k: _canonical(v) for k, v in sorted(obj.attrs.items())} if obj is not None else {}
        members.append([name, type(link).__name__, attrs])
    return {"attrs": {k: _canonical(v) for k, v in sorted(group.attrs.items())}, "members": members}
