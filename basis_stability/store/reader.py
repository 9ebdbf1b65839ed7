"""Read run files lazily: ``open_run(path)`` never loads a whole file.

Example:
    >>> with open_run("run.h5") as run:  # doctest: +SKIP
    ...     print(run.layer_names, run.n_snapshots)
    ...     w_last = run.layer("features.0")[-1]  # (m, n) float32, one chunk read
    ...     biases = run.state(-1)  # {"features.0.bias": (32,) float32, ...} (format 1.3)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import ConfigError, DamagedRunError, RunFileError
from . import format as fmt
from . import layout
from . import state as st
from .h5io import (
    has_signature,
    metadata_digest,
    open_readonly,
    retrying,
    stored_digest,
)
from .paths import as_path

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class LayerInfo:
    """What the run file says about one recorded layer."""

    name: str
    param_name: str
    kind: str
    orig_shape: tuple[int, ...]
    shape: tuple[int, int]  # tall (m, n)
    transposed: bool
    storage_dtype: str
    orientation: str = "out_in"  # how the parameter is stored; "in_out" since format 1.3

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]


class LayerSnapshots:
    """The committed snapshots of one layer, read on demand as float32 ``(m, n)`` arrays.

    Indexing with an int gives one matrix, with a slice or list a ``(k, m, n)`` stack; negative
    indices count from the last committed snapshot.
    """

    def __init__(self, run: Run, info: LayerInfo) -> None:
        self._run = run
        self.info = info
        self._ds = run.dataset(info.name)

    def __len__(self) -> int:
        return self._run.n_snapshots

    def _check(self, t: int) -> int:
        n = len(self)
        if not -n <= t < n:
            raise IndexError(f"snapshot {t} out of range for {n} snapshots of {self.info.name}")
        return t % n

    def __getitem__(self, key: int | slice | list[int]) -> np.ndarray:
        if isinstance(key, slice):
            idx = list(range(*key.indices(len(self))))
        elif isinstance(key, (list, tuple, np.ndarray)):
            idx = [self._check(int(t)) for t in key]
        else:
            return fmt.decode(self.raw(self._check(int(key))), self.info.storage_dtype)
        if not idx:
            return np.empty((0, *self.info.shape), dtype=np.float32)
        return np.stack([fmt.decode(self.raw(t), self.info.storage_dtype) for t in idx])

    def raw(self, t: int) -> np.ndarray:
        """Snapshot ``t`` (non-negative, committed) exactly as stored, checksum verified.

        Raises:
            DamagedRunError: the stored row fails its checksum or cannot be read.
        """
        what = f"layer {self.info.name} snapshot {t}"
        if not chunk_written(self._ds, t):
            raise DamagedRunError(
                f"{self._run.path}: {what} has no data in the file (its chunk was never written, "
                "e.g. a disk filled up); the file is damaged. Re-record it or restore a copy."
            )
        return read_checked(self._ds, t, self._run.path, what)

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in range(len(self)):
            yield self[t]

    def original(self, t: int, stored: bool = False) -> np.ndarray:
        """Snapshot ``t`` in the parameter's own shape (undoes the tall view).

        Args:
            t: the snapshot index (negative counts from the end).
            stored: the values exactly as stored (bfloat16 as its raw uint16 bits, checksum
                verified) instead of float32.
        """
        mat = self.raw(self._check(int(t))) if stored else self[t]
        if self.info.transposed:
            mat = mat.T
        return np.ascontiguousarray(mat).reshape(self.info.orig_shape)


class Run:
    """An open run file. Prefer :func:`open_run`; close it (or use ``with``) when done."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        # one committed count, read before any layer is opened: a live writer grows layers
        # before /snapshots, so every layer opened afterwards holds at least this many rows
        self._tables = {  # opened once here, so damaged headers fail at open, not mid-command
            spec.path: file[spec.path]
            for spec in layout.TABLES
            if spec is not layout.EVENTS or spec.path in file
        }
        self.n_snapshots = len(self._tables[layout.SNAPSHOTS.path])
        self.attrs: dict[str, Any] = {k: plain_value(v) for k, v in file.attrs.items()}
        self.layers: list[LayerInfo] = _layer_infos(path, file, self.n_snapshots)
        self._by_name = {info.name: info for info in self.layers}
        self._config = _parse_config(path, self.attrs.get("config", "{}"))
        self._state: _StateData | None = None  # /state, read and checked on first use
        version = str(self.attrs.get("format_version", ""))
        if fmt.at_least(version, layout.EVENTS.since) and layout.EVENTS.path not in file:
            raise _damaged(path, "`/events` is missing (format 1.1 and later have it)")
        if fmt.at_least(version, fmt.CHECKSUMS_SINCE) and stored_digest(file) != (
            metadata_digest(file)
        ):
            raise _damaged(
                path,
                "its names and attributes fail their checksum (`metadata_sha256`): one was "
                "changed or damaged",
            )

    @property
    def h5(self) -> h5py.File:
        """The open (read-only) HDF5 file, for code that copies or inspects it (recovery, the
        analysis cache); its layout is :mod:`basis_stability.store.layout`'s. Do not close it:
        :meth:`close` does."""
        return self._file

    # ------------------------------------------------------------------ metadata
    @property
    def format_version(self) -> str:
        return str(self.attrs["format_version"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    @property
    def model_class(self) -> str:
        return str(self.attrs.get("model_class", ""))

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    def info(self, name: str) -> LayerInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"No layer {name!r} in {self.path}; it has: {', '.join(self.layer_names[:20])}"
            ) from None

    def dataset(self, name: str) -> h5py.Dataset:
        """The HDF5 dataset of one layer, as stored (``(rows, m, n)``, rows >= n_snapshots)."""
        self.info(name)
        encode = fmt.encode_name if _names_encoded(self._file) else str
        return self._file[layout.LAYERS.path][encode(name)]

    def layer(self, name: str) -> LayerSnapshots:
        """The lazily-read snapshots of one layer."""
        return LayerSnapshots(self, self.info(name))

    # ------------------------------------------------------------------ state (format 1.3)
    @property
    def state_index(self) -> st.StateIndex:
        """What ``/state/index`` says: the stored entries, the model's state-dict keys and
        ties (an empty index for a run without ``/state``). Read and checked on first use.

        Raises:
            DamagedRunError: ``/state`` contradicts itself or the file, or fails its checksum.
        """
        return self._state_data().index

    @property
    def state_keys(self) -> list[str]:
        """The state-dict keys each snapshot stores besides the matrices (biases, buffers)."""
        return [e.key for e in self.state_index.entries]

    @property
    def model_keys(self) -> list[st.ModelKey] | None:
        """Every key of the recorded model's ``state_dict()`` with its shape and dtype; None
        when the run does not say (recorded before format 1.3, or imported from checkpoints)."""
        model = self.state_index.model
        return None if model is None else list(model)

    def state_index_bytes(self) -> bytes:
        """``/state/index`` exactly as stored (empty for a run without ``/state``)."""
        return self._state_data().raw

    def state_row(self, dtype: str, t: int) -> np.ndarray:
        """Snapshot ``t`` (non-negative, committed) of the packed ``/state/<dtype>`` row,
        exactly as stored, checksum verified.

        Raises:
            DamagedRunError: the row fails its checksum or was never written.
        """
        ds = self._state_data().values[dtype]
        what = f"state {dtype} snapshot {t}"
        if not chunk_written(ds, t):
            raise DamagedRunError(
                f"{self.path}: {what} has no data in the file (its chunk was never written, "
                "e.g. a disk filled up); the file is damaged. Re-record it or restore a copy."
            )
        return read_checked(ds, t, self.path, what)

    def state(self, t: int, stored: bool = False) -> dict[str, np.ndarray]:
        """The small state of snapshot ``t`` (negative counts from the end): ``{key: array}``
        in state-dict order, each in its own shape and dtype, exactly as recorded.

        Args:
            t: the snapshot index.
            stored: give bfloat16 entries as their raw uint16 bits and bool ones as uint8 (as
                stored) instead of float32 (widened exactly) and bool.

        Returns:
            An empty dict for a run without state (``--no-biases``, or older than format 1.3).
        """
        n = self.n_snapshots
        if not -n <= t < n:
            raise IndexError(f"snapshot {t} out of range for {n} snapshots of {self.path}")
        out: dict[str, np.ndarray] = {}
        for dtype, group, _ in self.state_index.layout():
            row = self.state_row(dtype, t % n)
            values = row if stored else st.decode(row, dtype)
            out.update(st.unpack(values, group))
        return {e.key: out[e.key] for e in self.state_index.entries}

    def _state_data(self) -> _StateData:
        if self._state is None:
            self._state = _load_state(self.path, self._file, self.n_snapshots)
        return self._state

    # ------------------------------------------------------------------ indices
    def index(self) -> np.ndarray:
        """The committed rows of ``/snapshots``: a ``(T,)`` structured array of ``step``,
        ``epoch``, ``wall_time`` and ``unix_time``, checksum verified.

        Raises:
            DamagedRunError: the snapshot table cannot be read.
        """
        return read_checked(
            self._tables[layout.SNAPSHOTS.path],
            slice(0, self.n_snapshots),
            self.path,
            "the snapshot table",
        )

    @property
    def steps(self) -> np.ndarray:
        return self.index()["step"]

    @property
    def epochs(self) -> np.ndarray:
        return self.index()["epoch"]

    @property
    def wall_time(self) -> np.ndarray:
        return self.index()["wall_time"]

    @property
    def metric_names(self) -> list[str]:
        names = self._tables[layout.METRIC_NAMES.path]
        raw = read_checked(names, slice(None), self.path, "metric names")
        try:
            return [n.decode() for n in raw]
        except UnicodeDecodeError:
            raise DamagedRunError(
                f"{self.path}: a metric name is not UTF-8; the file is damaged. Re-record it or "
                "restore a copy."
            ) from None

    def events(self) -> list[dict[str, Any]]:
        """The decisions logged into the run (format 1.1: ``/events``), oldest first."""
        # None: format 1.0 (later formats are checked at open)
        ds = self._tables.get(layout.EVENTS.path)
        if ds is None:
            return []
        if self._file.swmr_mode:
            ds.refresh()
        out = []
        for i, row in enumerate(read_checked(ds, slice(None), self.path, "the event log")):
            try:
                event = json.loads(row.decode())
            except (UnicodeDecodeError, ValueError):
                event = None
            if not isinstance(event, dict):
                raise DamagedRunError(
                    f"{self.path}: event {i} in /events is not a JSON object; the file is "
                    "damaged. Re-record it or restore a copy."
                )
            out.append(event)
        return out

    def metrics_array(self) -> np.ndarray:
        """``(T, K)`` float64 metrics, NaN where a snapshot did not log a metric."""
        names = self.metric_names
        values = self._tables[layout.METRIC_VALUES.path]
        out = np.full((self.n_snapshots, len(names)), np.nan)
        rows = min(values.shape[0], self.n_snapshots)
        cols = min(values.shape[1], len(names))
        if rows and cols:
            out[:rows, :cols] = read_checked(
                values, (slice(0, rows), slice(0, cols)), self.path, "the metric values"
            )
        return out

    def snapshots(self) -> pd.DataFrame:
        """One row per snapshot: ``snapshot, step, epoch, wall_time`` and every metric."""
        import pandas as pd

        idx = self.index()
        frame = pd.DataFrame(
            {
                "snapshot": np.arange(self.n_snapshots),
                "step": idx["step"],
                "epoch": idx["epoch"],
                "wall_time": idx["wall_time"],
            }
        )
        metrics = self.metrics_array()
        for j, name in enumerate(self.metric_names):
            # a metric may share a name with an index column ("epoch"): never replace the index
            frame[f"{name} (metric)" if name in frame.columns else name] = metrics[:, j]
        return frame

    # ------------------------------------------------------------------ live runs
    def refresh(self) -> int:
        """Pick up snapshots committed since opening (the file may be written live).

        Returns:
            The number of new snapshots.
        """
        if not self._file.swmr_mode:  # opened after its writer closed: nothing can grow
            return 0
        for ds in self._tables.values():
            ds.refresh()
        for info in self.layers:
            self.dataset(info.name).refresh()
        if self._state is not None:
            for ds in self._state.values.values():
                ds.refresh()
        before, self.n_snapshots = self.n_snapshots, len(self._tables[layout.SNAPSHOTS.path])
        return self.n_snapshots - before

    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, layers={len(self.layers)}, "
            f"snapshots={self.n_snapshots}, model={self.model_class!r})"
        )


def plain_value(value: Any) -> Any:
    """An HDF5 attribute value as plain Python: bytes decoded (UTF-8), numpy scalars and arrays
    as Python scalars and lists.

    Example:
        >>> plain_value(np.bytes_(b"float32")), plain_value(np.int64(3))
        ('float32', 3)
    """
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_checked(ds: h5py.Dataset, sel: Any, path: Path, what: str) -> np.ndarray:
    """``ds[sel]``, with a checksum failure or unreadable data as a clear error naming ``what``."""
    try:
        return retrying(lambda: ds[sel], live=ds.file.swmr_mode)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DamagedRunError(
            f"{path}: {what} cannot be read ({_first_line(exc)}); the file is damaged there. "
            "Re-record it or restore a copy."
        ) from None


def chunk_written(ds: h5py.Dataset, t: int) -> bool:
    """Whether row ``t`` of a one-row-per-chunk dataset (a layer, a state row) has data in the
    file (an unwritten chunk reads as zeros without any error)."""
    if ds.chunks is None or ds.chunks[0] != 1:
        return True  # not the writer's layout: nothing to tell
    try:
        return ds.id.get_chunk_info_by_coord((t,) + (0,) * (ds.ndim - 1)).byte_offset is not None
    except (OSError, RuntimeError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).split("\n")[0]
    return text[:160]


def _damaged(path: Path, what: str) -> DamagedRunError:
    return DamagedRunError(
        f"{path}: {what}; the file is damaged. Run `bstab validate` on it for details, and "
        "re-record it or restore a copy."
    )


def _parse_config(path: Path, text: Any) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except (TypeError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise _damaged(path, "the root attribute `config` is not a JSON object")
    return config


@dataclass(frozen=True)
class _StateData:
    index: st.StateIndex
    values: dict[str, h5py.Dataset]  # dtype -> (rows, N) packed rows
    raw: bytes


def _load_state(path: Path, file: h5py.File, n_snapshots: int) -> _StateData:
    """``/state`` checked like the layers: a readable index that agrees with its datasets,
    rows for every committed snapshot, no more declared bytes than the file holds."""
    group = file.get(st.GROUP)
    if group is None:
        return _StateData(st.StateIndex(), {}, b"")
    try:
        ds = st.index_dataset(group)
    except ValueError as exc:
        raise _damaged(path, str(exc)) from None
    raw = read_checked(ds, slice(None), path, "the state index `/state/index`").tobytes()
    try:
        index = st.StateIndex.from_json(raw)
        values = st.value_datasets(group, index)
    except ValueError as exc:
        raise _damaged(path, f"`/state` is inconsistent: {exc}") from None
    declared = sum(ds.dtype.itemsize * ds.shape[1] for ds in values) * n_snapshots
    if declared > os.path.getsize(path):
        raise _damaged(
            path,
            f"its state declares {declared:,} bytes of committed snapshots but the file holds "
            f"{os.path.getsize(path):,} bytes",
        )
    for ds in values:
        if ds.shape[0] < n_snapshots:
            raise _damaged(
                path, f"`{ds.name}` holds {ds.shape[0]} rows for {n_snapshots} snapshots"
            )
    return _StateData(index, {dtype: ds for (dtype, _, _), ds in zip(index.layout(), values)}, raw)


_LAYER_ATTRS = tuple(spec.name for spec in layout.LAYER_ATTRS if spec.required)


def _layer_infos(path: Path, file: h5py.File, n_snapshots: int) -> list[LayerInfo]:
    """Every recorded layer, each checked against its own metadata and the file's size."""
    group = file[layout.LAYERS.path]
    if not isinstance(group, h5py.Group):
        raise _damaged(path, "`/layers` is not a group")
    decode = fmt.decode_name if _names_encoded(file) else str
    infos, seen = [], set()
    for stored in group:
        link = group.get(stored, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise _damaged(path, f"`/layers/{stored}` is a {type(link).__name__}, not a dataset")
        ds = group.get(stored)
        if not isinstance(ds, h5py.Dataset):
            raise _damaged(path, f"`/layers/{stored}` is a {type(ds).__name__}, not a dataset")
        if hash(ds.id) in seen:
            raise _damaged(path, f"`/layers/{stored}` is a second name for another layer")
        seen.add(hash(ds.id))
        infos.append(_layer_info(path, decode(stored), ds, n_snapshots))
    if not infos:
        raise RunFileError(
            f"{path} holds no recorded layers, so there is nothing to read. Record a model with "
            "at least one Linear, Conv or attention layer."
        )
    stored_bytes = sum(i.n_params * _itemsize(i) for i in infos) * n_snapshots
    if stored_bytes > os.path.getsize(path):
        raise _damaged(
            path,
            f"its layers declare {stored_bytes:,} bytes of committed snapshots but the file "
            f"holds {os.path.getsize(path):,} bytes",
        )
    return infos


def _itemsize(info: LayerInfo) -> int:
    return fmt.h5_dtype(info.storage_dtype).itemsize


def _layer_info(path: Path, name: str, ds: h5py.Dataset, n_snapshots: int) -> LayerInfo:
    from ..registry import ORIENTATIONS, OUT_IN, tall_shape

    where = f"layer {name!r}"
    a = ds.attrs
    missing = [key for key in _LAYER_ATTRS if key not in a]
    if missing:
        raise _damaged(path, f"{where} lacks the attribute(s) {', '.join(missing)}")
    if ds.ndim != 3:
        raise _damaged(path, f"{where} has shape {ds.shape}, not (snapshots, m, n)")
    m, n = int(ds.shape[1]), int(ds.shape[2])
    if m == 0 or n == 0:
        raise _damaged(path, f"{where} is a {m}x{n} matrix (empty)")
    storage = plain_value(a["storage_dtype"])
    if storage not in fmt.STORAGE_DTYPES:
        raise _damaged(path, f"{where} has an unknown storage_dtype {storage!r}")
    if ds.dtype != fmt.h5_dtype(storage):
        raise _damaged(path, f"{where} stores {ds.dtype} data but says storage_dtype {storage!r}")
    try:
        orig = tuple(int(d) for d in np.asarray(a["orig_shape"]).ravel())
        transposed = a["transposed"]
        if not isinstance(transposed, (bool, np.bool_)):
            raise TypeError
        orientation = str(plain_value(a.get("orientation", OUT_IN)))
        if orientation not in ORIENTATIONS:
            raise ValueError
        tall = tall_shape(list(orig), orientation) if orig else None
    except (TypeError, ValueError, ConfigError):
        raise _damaged(
            path, f"{where} has an unreadable orig_shape, transposed or orientation"
        ) from None
    if tall != ((m, n), bool(transposed)):
        raise _damaged(
            path,
            f"{where}: orig_shape {orig} and transposed={bool(transposed)} do not give the "
            f"stored {m}x{n} matrix",
        )
    if ds.shape[0] < n_snapshots:
        raise _damaged(path, f"{where} holds {ds.shape[0]} rows for {n_snapshots} snapshots")
    return LayerInfo(
        name=name,
        param_name=str(plain_value(a["param_name"])),
        kind=str(plain_value(a["kind"])),
        orig_shape=orig,
        shape=(m, n),
        transposed=bool(transposed),
        storage_dtype=storage,
        orientation=orientation,
    )


def _names_encoded(file: h5py.File) -> bool:
    version = plain_value(file.attrs.get("format_version", ""))
    return fmt.at_least(str(version), fmt.NAMES_ENCODED_SINCE)


def check_header(path: Path, file: h5py.File) -> None:
    """Raise a clear :class:`RunFileError` unless ``file`` is a run this reader understands."""
    name = file.attrs.get("format")
    if name is None:
        raise RunFileError(
            f"{path} is an HDF5 file but not a basis_stability run (it has no "
            "root attribute `format`). Pass a file written by `bstab record`."
        )
    if plain_value(name) != fmt.FORMAT_NAME:
        raise RunFileError(
            f"{path} is an HDF5 file of another kind (format {plain_value(name)!r}, "
            f"expected {fmt.FORMAT_NAME!r}). Pass a file written by bstab."
        )
    version = plain_value(file.attrs.get("format_version", "?"))
    try:
        major, _ = fmt.parse_version(version)
    except ValueError:
        raise RunFileError(
            f"{path} has an unreadable format_version {version!r}; expected "
            "'MAJOR.MINOR'. The file is damaged."
        ) from None
    if major > fmt.parse_version(fmt.FORMAT_VERSION)[0]:
        raise RunFileError(
            f"{path} uses format version {version}, newer than this "
            f"basis_stability reads ({fmt.FORMAT_VERSION}). "
            "Upgrade basis_stability."
        )
    required_tables = [spec.path for spec in layout.TABLES if spec.since is None]
    for required in (layout.LAYERS.path, *required_tables):
        if required not in file:
            raise RunFileError(
                f"{path} is a basis_stability run missing `/{required}`; it is "
                "damaged. Run `bstab validate` on it for details."
            )


def open_run(path: str | os.PathLike) -> Run:
    """Open a run file for reading (also while it is being written).

    Raises:
        RunFileError: missing path, a directory, not HDF5, truncated or corrupt, a foreign HDF5
            file, or a newer format major version. The message says what to do.
        ConfigError: ``path`` is not a path (a number, None...).
    """
    path = as_path(path)
    if not path.exists():
        raise RunFileError(
            f"No run file at {path}. Check the path; `bstab record` prints where it wrote its run."
        )
    if path.is_dir():
        raise RunFileError(f"Expected a run file but {path} is a directory.")
    if not has_signature(path) and not h5py.is_hdf5(path):
        raise RunFileError(
            f"{path} is not an HDF5 file (no HDF5 signature). Pass a run file "
            "written by `bstab record`."
        )
    file = open_readonly(path)
    try:
        check_header(path, file)
        return Run(path, file)
    except RunFileError:
        file.close()
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
        file.close()  # damaged metadata that HDF5 could open but not read
        raise _damaged(path, f"its structure cannot be read ({_first_line(exc)})") from None
    except BaseException:
        file.close()
        raise
