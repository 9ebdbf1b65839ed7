"""A snapshot's small state (format 1.3): biases, norm weights and buffers, packed by dtype.

What the index says and how rows are packed (the datasets themselves are declared in
:mod:`.layout`; prose: checkpoints_spec/FORMAT.md, *State*)::

    /state/index      (L,) uint8, UTF-8 JSON written once at creation:
                      {"entries": [{"key", "dtype", "shape", "offset"}, ...],
                       "model": [[key, shape or null, dtype], ...] or null,
                       "tied": {alias key: key}}
    /state/<dtype>    (T', N) one row per snapshot: every entry of that dtype, flattened and
                      concatenated in index order (``offset`` is where an entry starts);
                      one snapshot per chunk (1, N), fletcher32

One dataset per dtype, not one per entry: the writer's cost is per dataset and per snapshot
(about 0.25 ms each in SWMR mode, measured), and a model with a hundred norm layers holds
hundreds of entries. Every entry is stored exactly, in its own dtype (bfloat16 as its raw uint16
bits, bool as uint8), so a float32 recording reproduces the model bit for bit.

``model`` lists every key of the recorded model's ``state_dict()`` (so an export can name what
it lacks); ``tied`` maps a key that shares its tensor with another key (a head tied to an
embedding) to that key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from . import format as fmt
from . import layout

GROUP = layout.STATE.path
INDEX = layout.STATE_INDEX.path.rsplit("/", 1)[1]
SINCE = fmt.STATE_SINCE


@dataclass(frozen=True)
class StateEntry:
    """One stored state-dict entry: its key, torch dtype name, shape (``()`` for 0-D) and where
    it starts in its dtype's packed row."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelKey:
    """One key of the recorded model's ``state_dict()``; ``shape`` is None for a non-tensor."""

    key: str
    shape: tuple[int, ...] | None
    dtype: str


@dataclass(frozen=True)
class StateIndex:
    """What ``/state/index`` says: the stored entries, the model's keys (None: unknown), ties."""

    entries: tuple[StateEntry, ...] = ()
    model: tuple[ModelKey, ...] | None = None
    tied: Mapping[str, str] = field(default_factory=dict)

    def layout(self) -> list[tuple[str, list[StateEntry], int]]:
        """``(dtype, entries, row width)`` per value dataset, in order of first appearance."""
        groups: dict[str, list[StateEntry]] = {}
        for entry in self.entries:
            groups.setdefault(entry.dtype, []).append(entry)
        return [(d, group, sum(e.size for e in group)) for d, group in groups.items()]

    def missing(self, recorded: set[str]) -> list[str] | None:
        """The model's keys a full export lacks, given the recorded matrices' parameter names
        (None: the run does not list its model's keys). Tied keys follow their owner; empty
        tensors are recreated from their shape."""
        if self.model is None:
            return None
        have = recorded | {e.key for e in self.entries}
        have |= {alias for alias, owner in self.tied.items() if owner in have}
        return [
            k.key
            for k in self.model
            if k.key not in have
            and not (k.shape is not None and math.prod(k.shape) == 0 and k.dtype in DTYPES)
        ]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "entries": [
                    {"key": e.key, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset}
                    for e in self.entries
                ],
                "model": None
                if self.model is None
                else [
                    [k.key, None if k.shape is None else list(k.shape), k.dtype] for k in self.model
                ],
                "tied": dict(self.tied),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StateIndex:
        """Parse and check an index; ``ValueError`` says what is wrong with it."""
        try:
            doc = json.loads(bytes(raw).decode())
            entries = tuple(
                StateEntry(str(e["key"]), str(e["dtype"]), _shape(e["shape"]), int(e["offset"]))
                for e in doc["entries"]
            )
            model = doc["model"]
            if model is not None:
                model = tuple(
                    ModelKey(str(k), None if s is None else _model_shape(s), str(d))
                    for k, s, d in model
                )
            tied = {str(a): str(b) for a, b in dict(doc["tied"]).items()}
        except (UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"it is not a state index ({type(exc).__name__}: {exc})") from None
        index = cls(entries, model, tied)
        index.check()
        return index

    def check(self) -> None:
        """Raise ``ValueError`` unless the entries are known dtypes, unique, and tile each row."""
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("a key is listed twice")
        for dtype, group, _ in self.layout():
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}")
            at = 0
            for e in group:
                if e.offset != at or e.size == 0:
                    raise ValueError(f"entry {e.key!r} does not follow the one before it")
                at += e.size


def _shape(value: object) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value)  # type: ignore[union-attr]
    if any(d < 0 for d in shape) or len(shape) > 1:
        raise ValueError(f"shape {shape} is not that of a 0-D or 1-D entry")
    return shape


def _model_shape(value: object) -> tuple[int, ...]:
    return tuple(int(d) for d in value)  # type: ignore[union-attr]


DTYPES: dict[str, str] = fmt.format_description()["state"]["dtypes"]  # torch name -> on disk


def plan(
    entries: Sequence[tuple[str, str, tuple[int, ...]]],
    model: Sequence[ModelKey] | None = None,
    tied: Mapping[str, str] | None = None,
) -> StateIndex:
    """The index for ``(key, dtype, shape)`` entries: offsets assigned, packed by dtype."""
    at: dict[str, int] = {}
    placed = []
    for key, dtype, shape in entries:
        entry = StateEntry(key, dtype, tuple(shape), at.get(dtype, 0))
        at[dtype] = entry.offset + entry.size
        placed.append(entry)
    index = StateIndex(tuple(placed), None if model is None else tuple(model), dict(tied or {}))
    index.check()
    return index


def h5_dtype(dtype: str) -> np.dtype:
    """The on-disk dtype of a state dtype (bfloat16 as uint16 bits, bool as uint8)."""
    return np.dtype(DTYPES[dtype])


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> numpy in the entry's own dtype (bfloat16 widened exactly to float32)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "bool":
        return raw.astype(bool)
    return raw


def pack(group: Sequence[StateEntry], values: Mapping[str, np.ndarray], dtype: str) -> np.ndarray:
    """One dtype's packed row from ``{key: array}`` (each in the on-disk dtype).

    Raises:
        KeyError, ValueError: an entry is missing or has another shape or dtype.
    """
    disk = h5_dtype(dtype)
    parts = []
    for entry in group:
        arr = np.asarray(values[entry.key])
        if arr.shape != entry.shape or arr.dtype != disk:
            raise ValueError(
                f"state entry {entry.key!r} is {arr.dtype} {arr.shape}, the run stores "
                f"{dtype} {entry.shape}"
            )
        parts.append(arr.reshape(-1))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def unpack(row: np.ndarray, group: Sequence[StateEntry]) -> dict[str, np.ndarray]:
    """``{key: array}`` of one packed row (views into it, in the entries' shapes)."""
    return {e.key: row[e.offset : e.offset + e.size].reshape(e.shape) for e in group}


# ------------------------------------------------------------------------------- HDF5
def value_dataset(group: h5py.Group, dtype: str, width: int, rows: int = 0) -> h5py.Dataset:
    """``/state/<dtype>`` holding ``rows`` packed rows of ``width`` values, as
    :data:`layout.STATE_VALUES` declares it."""
    ds = layout.STATE_VALUES.create(group, dtype, shape=(rows, width), dtype=h5_dtype(dtype))
    layout.write_attrs(ds, layout.STATE_VALUE_ATTRS, {"dtype": dtype})
    return ds


def create_group(f: h5py.File, index: StateIndex, raw: bytes | None = None) -> h5py.Group:
    """``/state`` with its index (``raw``: the index's bytes as a file holds them, for a copy)
    and one empty value dataset per dtype."""
    group = layout.STATE.create(f)
    raw = np.frombuffer(index.to_json() if raw is None else raw, dtype=np.uint8)
    layout.STATE_INDEX.create(group, INDEX, data=raw)
    for dtype, _, width in index.layout():
        value_dataset(group, dtype, width)
    return group


def index_dataset(group: object) -> h5py.Dataset:
    """``/state/index`` of a ``/state`` group; ``ValueError`` when it is not one."""
    if not isinstance(group, h5py.Group):
        raise ValueError(f"`/{GROUP}` is a {type(group).__name__}, not a group")
    if not isinstance(group.get(INDEX, getlink=True), h5py.HardLink):
        raise ValueError(f"`/{GROUP}/{INDEX}` is missing or a link")
    ds = group.get(INDEX)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype != np.uint8:
        raise ValueError(f"`/{GROUP}/{INDEX}` is not a 1-D uint8 dataset")
    return ds


def value_datasets(group: h5py.Group, index: StateIndex) -> list[h5py.Dataset]:
    """The value dataset of each dtype in ``index.layout()`` order, each checked against the
    index (on-disk dtype, row width, layout); ``ValueError`` says what disagrees."""
    out = []
    for dtype, _, width in index.layout():
        where = f"`/{GROUP}/{dtype}`"
        if not isinstance(group.get(dtype, getlink=True), h5py.HardLink):
            raise ValueError(f"{where} is missing or a link")
        ds = group.get(dtype)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
            raise ValueError(f"{where} is not a (snapshots, N) dataset")
        if ds.shape[1] != width or ds.dtype != h5_dtype(dtype):
            raise ValueError(
                f"{where} is {ds.dtype} with rows of {ds.shape[1]} values; the index says "
                f"{h5_dtype(dtype)} rows of {width}"
            )
        spec, shape = layout.STATE_VALUES, (ds.shape[0], width)
        if ds.chunks != spec.chunks_of(shape) or ds.maxshape != spec.maxshape_of(shape):
            raise ValueError(f"{where} is not chunked one snapshot per chunk")
        out.append(ds)
    return out
