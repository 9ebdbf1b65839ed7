"""The run file's HDF5 layout, declared once: every group, dataset and attribute the writer makes.

This is the one place the code states the on-disk format (the normative prose is
``checkpoints_spec/FORMAT.md``; ``run_format.json`` beside this module is its machine-checkable
twin, which ``bstab validate`` reads). :mod:`.writer` creates a run from these tables, truncates
the datasets they mark as one row per snapshot when it resumes one, and re-creates every dataset
from them when it recovers one; :mod:`.state` makes ``/state`` from them; :mod:`.reader` opens
the tables by their paths. Layout of format 1.3 (``T`` committed snapshots, ``T'`` = ``T`` or
``T + 1`` rows: a half-written snapshot that readers ignore)::

    path               shape       dtype                  chunks           maxshape      rows
    /                  root attributes ROOT_ATTRS, fixed-length UTF-8 bytes (format 1.2)
    /layers/           group, creation order tracked (= layer order); attribute metadata_sha256
    /layers/<name>     (T', m, n)  storage dtype (*)      (1, m, n)        (None, m, n)  snapshot
    /state/            group (format 1.3, optional), creation order tracked
    /state/index       (L,)        uint8, UTF-8 JSON      (min(L, 2**20),) (L,)          once
    /state/<dtype>     (T', N)     that dtype (**)        (1, N)           (None, N)     snapshot
    /snapshots         (T,)        SNAPSHOT_DTYPE         (256,)           (None,)       commit
    /events            (E,)        S4096 JSON objects     (16,)            (None,)       log (1.1)
    /metrics/names     (K,)        S128                   (64,)            (None,)       log
    /metrics/values    (<= T', K)  float64, fill NaN      (256, 16)        (None, None)  at most

    (*)  float32 <f4, float16 <f2, bfloat16 <u2 (raw bits): ``format.h5_dtype``
    (**) each entry exactly in its own dtype (bfloat16 as <u2, bool as u1): ``state.h5_dtype``

Every dataset carries HDF5's fletcher32 checksum (format 1.2), so damaged data is an error on
read, never a silently different number; rows of a layer or a state dtype are one chunk each, so
one snapshot is one read. Each ``/layers/<name>`` has the attributes ``LAYER_ATTRS`` and each
``/state/<dtype>`` the attributes ``STATE_VALUE_ATTRS``. Rows: ``snapshot`` datasets hold one row
per snapshot and are cut back to ``T`` when a run is resumed; ``at most`` likewise, but may hold
fewer (a run that logs no metrics keeps ``/metrics/values`` empty); growing ``/snapshots``
commits a snapshot (it is written last); ``log`` rows are appended independently of the commit.

Example:
    >>> [spec.path for spec in TABLES]
    ['snapshots', 'events', 'metrics/names', 'metrics/values']
    >>> LAYER.chunks_of((0, 64, 32)), LAYER.maxshape_of((0, 64, 32))
    ((1, 64, 32), (None, 64, 32))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from . import format as fmt

Shape = tuple[int, ...]

# how a dataset's rows relate to the committed snapshots (the ``rows`` column above)
SNAPSHOT_ROWS = "snapshot"  # T or T + 1 rows; cut back to T on resume
AT_MOST_SNAPSHOT_ROWS = "at most"  # at most T + 1 rows; cut back to T on resume
COMMIT_ROWS = "commit"  # /snapshots itself: its length is T
LOG_ROWS = "log"  # appended on their own (events, metric names)
ONCE = "once"  # written at creation, never grown


# ------------------------------------------------------------------------------ attributes
def fixed_text(value: object) -> np.bytes_:
    """A string attribute as fixed-length UTF-8 bytes (format 1.2): kept in the checksummed
    object header, where a variable-length string lives in HDF5's global heap, which has no
    checksum and on which one damaged file made HDF5 loop forever."""
    return np.bytes_(str(value).encode())


def _int_array(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: its name, how a value is stored, whether a reader requires it."""

    name: str
    encode: Callable[[Any], Any] = fixed_text
    required: bool = True


ROOT_ATTRS = tuple(
    AttrSpec(name)
    for name in (
        "format",
        "format_version",
        "package_version",
        "torch_version",
        "model_class",
        "created",
        "storage_dtype",
        "config",  # JSON
    )
)
LAYER_ATTRS = (
    AttrSpec("param_name"),
    AttrSpec("kind"),
    AttrSpec("orig_shape", _int_array),
    AttrSpec("transposed", bool),
    AttrSpec("orientation", required=False),  # since 1.3; absent means "out_in"
    AttrSpec("storage_dtype"),
)
STATE_VALUE_ATTRS = (AttrSpec("dtype"),)


def write_attrs(obj: h5py.HLObject, specs: tuple[AttrSpec, ...], values: Mapping[str, Any]):
    """Store ``values[spec.name]`` as each attribute of ``specs`` (in their order) on ``obj``."""
    for spec in specs:
        obj.attrs[spec.name] = spec.encode(values[spec.name])


# ------------------------------------------------------------------------------ datasets
def _row_chunks(shape: Shape) -> Shape:
    return (1, *shape[1:])  # one snapshot per chunk


def _grows_in_rows(shape: Shape) -> tuple[int | None, ...]:
    return (None, *shape[1:])


def _fixed_chunks(*chunks: int) -> Callable[[Shape], Shape]:
    return lambda shape: chunks


def _whole(shape: Shape) -> Shape:
    return (min(shape[0], 1 << 20),)


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset (or each dataset of one kind: a layer, a state dtype) is created.

    Attributes:
        path: where it lives; ``<...>`` marks a name given per dataset (``layers/<name>``).
        dtype: the on-disk dtype; None where it is given per dataset.
        ndim: its number of dimensions.
        chunks_of: its chunk shape, from its shape.
        maxshape_of: its maximum shape, from its shape (None: fixed size).
        rows: how its rows relate to the committed snapshots (``SNAPSHOT_ROWS``, ...).
        fillvalue: what unwritten values read as (None: HDF5's default).
        since: the format version that added it (None: every version has it).
    """

    path: str
    dtype: Any
    ndim: int
    chunks_of: Callable[[Shape], Shape]
    maxshape_of: Callable[[Shape], tuple[int | None, ...] | None]
    rows: str
    fillvalue: float | None = None
    since: tuple[int, int] | None = None

    @property
    def per_snapshot(self) -> bool:
        """Whether its rows are snapshots' rows, which a resumed run cuts back to ``T``."""
        return self.rows in (SNAPSHOT_ROWS, AT_MOST_SNAPSHOT_ROWS)

    def create(
        self,
        parent: h5py.Group,
        name: str | None = None,
        *,
        shape: Shape | None = None,
        data: np.ndarray | None = None,
        dtype: Any = None,
    ) -> h5py.Dataset:
        """Create it in ``parent`` (the file, or the group of a per-name kind) with fletcher32.

        Args:
            parent: the file for a table, ``/layers`` or ``/state`` for a layer or state dtype.
            name: the dataset's name in ``parent`` (default: :attr:`path`, its parent groups
                created as needed).
            shape: its shape (default: that of ``data``, else empty).
            data: the rows to store (a recovered run's).
            dtype: the on-disk dtype where :attr:`dtype` is None.
        """
        if name is None and "/" in self.path:
            parent.require_group(self.path.rsplit("/", 1)[0])
        if data is not None:
            shape = np.shape(data)
        elif shape is None:
            shape = (0,) * self.ndim
        extra = {} if self.fillvalue is None else {"fillvalue": self.fillvalue}
        return parent.create_dataset(
            self.path if name is None else name,
            shape=shape,
            data=data,
            maxshape=self.maxshape_of(shape),
            chunks=self.chunks_of(shape),
            dtype=self.dtype if dtype is None else dtype,
            fletcher32=True,
            **extra,
        )


@dataclass(frozen=True)
class GroupSpec:
    """A group: its path and whether it keeps its members in creation order."""

    path: str
    track_order: bool = False

    def create(self, f: h5py.Group) -> h5py.Group:
        return f.create_group(self.path, track_order=self.track_order)


LAYERS = GroupSpec("layers", track_order=True)
LAYER = DatasetSpec("layers/<name>", None, 3, _row_chunks, _grows_in_rows, SNAPSHOT_ROWS)

STATE = GroupSpec("state", track_order=True)  # format 1.3
STATE_INDEX = DatasetSpec("state/index", np.uint8, 1, _whole, lambda shape: None, ONCE)
STATE_VALUES = DatasetSpec("state/<dtype>", None, 2, _row_chunks, _grows_in_rows, SNAPSHOT_ROWS)

SNAPSHOTS = DatasetSpec(
    "snapshots", fmt.SNAPSHOT_DTYPE, 1, _fixed_chunks(256), _grows_in_rows, COMMIT_ROWS
)
EVENTS = DatasetSpec(
    "events", fmt.EVENT_DTYPE, 1, _fixed_chunks(16), _grows_in_rows, LOG_ROWS, since=(1, 1)
)
METRIC_NAMES = DatasetSpec(
    "metrics/names", fmt.NAME_DTYPE, 1, _fixed_chunks(64), _grows_in_rows, LOG_ROWS
)
METRIC_VALUES = DatasetSpec(
    "metrics/values",
    "<f8",
    2,
    _fixed_chunks(256, 16),
    lambda shape: (None, None),  # new metrics add columns
    AT_MOST_SNAPSHOT_ROWS,
    fillvalue=np.nan,
)
TABLES = (SNAPSHOTS, EVENTS, METRIC_NAMES, METRIC_VALUES)  # in creation order
DATASETS = (LAYER, STATE_INDEX, STATE_VALUES, *TABLES)
