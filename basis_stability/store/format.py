"""Constants and small helpers of the run-file format (prose spec: checkpoints_spec/FORMAT.md).

The machine-checkable description ``run_format.json`` beside this file is the single source of the
format name and version; the writer, the reader and ``bstab validate`` all read them from it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# (T,) compound dataset; its length is the number of committed snapshots (written last).
SNAPSHOT_DTYPE = np.dtype(
    [("step", "<i8"), ("epoch", "<f8"), ("wall_time", "<f8"), ("unix_time", "<f8")]
)
NAME_DTYPE = "S128"
EVENT_DTYPE = "S4096"  # one JSON object per decision (format 1.1)


@lru_cache(maxsize=1)
def format_description() -> dict[str, Any]:
    """The parsed ``run_format.json`` description."""
    text = resources.files(__package__).joinpath("run_format.json").read_text(encoding="utf-8")
    return json.loads(text)


FORMAT_NAME: str = format_description()["format"]
FORMAT_VERSION: str = format_description()["format_version"]


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0" -> (1, 0)``; raises ``ValueError`` on anything else."""
    major, minor = str(text).split(".")
    return int(major), int(minor)


def h5_dtype(storage_dtype: str) -> np.dtype:
    """The on-disk dtype for a storage dtype (bfloat16 is stored as its raw uint16 bits)."""
    return np.dtype(format_description()["layer"]["dtypes"][storage_dtype])


def decode(raw: np.ndarray, storage_dtype: str) -> np.ndarray:
    """On-disk values -> float32 array (bfloat16 bits are widened exactly)."""
    if storage_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def event_bytes() -> int:
    return np.dtype(EVENT_DTYPE).itemsize


# HDF5 gives '/' (a path separator) and '.' alone (the current group) meaning in a name; since
# format 1.2 layer names are stored percent-encoded so that any module name round-trips.
_NAME_ESCAPES = {"%": "%25", "/": "%2F"}
NAMES_ENCODED_SINCE = (1, 2)
CHECKSUMS_SINCE = (1, 2)  # every dataset carries HDF5's fletcher32 filter
STATE_SINCE = (1, 3)  # biases and buffers in /state, covered by the metadata digest


def encode_name(name: str) -> str:
    """A layer name as stored in ``/layers`` (reversible; ``decode_name`` undoes it).

    Example:
        >>> encode_name("enc/0.attn")
        'enc%2F0.attn'
    """
    if not name:
        raise ValueError("a layer name cannot be empty")
    out = "".join(_NAME_ESCAPES.get(ch, ch) for ch in name)
    return "%2E" if out == "." else out


def decode_name(stored: str) -> str:
    """The layer name behind a stored ``/layers`` entry (format >= 1.2)."""
    from urllib.parse import unquote

    return unquote(stored)


def at_least(version: str, since: tuple[int, int]) -> bool:
    """Whether a file of ``version`` has what format ``since`` added."""
    try:
        return parse_version(version) >= since
    except ValueError:
        return False
