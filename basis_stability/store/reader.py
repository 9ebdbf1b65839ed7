"""Read run files lazily: ``open_run(path)`` never loads a whole file.

Example:
    >>> with open_run("run.h5") as run:  # doctest: +SKIP
    ...     print(run.layer_names, run.n_snapshots)
    ...     w_last = run.layer("features.0")[-1]  # (m, n) float32, one chunk read
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

from ..errors import RunFileError
from . import format as fmt

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
        self._ds = run._file["layers"][info.name]

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
            return fmt.decode(self._ds[self._check(int(key))], self.info.storage_dtype)
        if not idx:
            return np.empty((0, *self.info.shape), dtype=np.float32)
        return np.stack([fmt.decode(self._ds[t], self.info.storage_dtype) for t in idx])

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in range(len(self)):
            yield self[t]

    def original(self, t: int) -> np.ndarray:
        """Snapshot ``t`` in the parameter's own shape (undoes the tall view)."""
        mat = self[t]
        if self.info.transposed:
            mat = mat.T
        return np.ascontiguousarray(mat).reshape(self.info.orig_shape)


class Run:
    """An open run file. Prefer :func:`open_run`; close it (or use ``with``) when done."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in file.attrs.items()}
        self.layers: list[LayerInfo] = [
            _layer_info(name, ds) for name, ds in file["layers"].items()
        ]
        self._by_name = {info.name: info for info in self.layers}
        self.n_snapshots = len(file["snapshots"])

    # ------------------------------------------------------------------ metadata
    @property
    def format_version(self) -> str:
        return str(self.attrs["format_version"])

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.attrs.get("config", "{}"))

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

    def layer(self, name: str) -> LayerSnapshots:
        """The lazily-read snapshots of one layer."""
        return LayerSnapshots(self, self.info(name))

    # ------------------------------------------------------------------ indices
    def _index(self) -> np.ndarray:
        return self._file["snapshots"][: self.n_snapshots]

    @property
    def steps(self) -> np.ndarray:
        return self._index()["step"]

    @property
    def epochs(self) -> np.ndarray:
        return self._index()["epoch"]

    @property
    def wall_time(self) -> np.ndarray:
        return self._index()["wall_time"]

    @property
    def metric_names(self) -> list[str]:
        return [n.decode() for n in self._file["metrics/names"][:]]

    def events(self) -> list[dict[str, Any]]:
        """The decisions logged into the run (format 1.1: ``/events``), oldest first."""
        ds = self._file.get("events")
        if ds is None:
            return []
        ds.refresh()
        return [json.loads(row.decode()) for row in ds[:]]

    def metrics_array(self) -> np.ndarray:
        """``(T, K)`` float64 metrics, NaN where a snapshot did not log a metric."""
        names = self.metric_names
        values = self._file["metrics/values"]
        out = np.full((self.n_snapshots, len(names)), np.nan)
        rows = min(values.shape[0], self.n_snapshots)
        cols = min(values.shape[1], len(names))
        out[:rows, :cols] = values[:rows, :cols]
        return out

    def snapshots(self) -> pd.DataFrame:
        """One row per snapshot: ``snapshot, step, epoch, wall_time`` and every metric."""
        import pandas as pd

        idx = self._index()
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
        self._file["snapshots"].refresh()
        for name in ("metrics/names", "metrics/values", "events"):
            if name not in self._file:
                continue
            self._file[name].refresh()
        for info in self.layers:
            self._file["layers"][info.name].refresh()
        before, self.n_snapshots = self.n_snapshots, len(self._file["snapshots"])
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


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _layer_info(name: str, ds: h5py.Dataset) -> LayerInfo:
    a = ds.attrs
    return LayerInfo(
        name=name,
        param_name=str(a["param_name"]),
        kind=str(a["kind"]),
        orig_shape=tuple(int(d) for d in a["orig_shape"]),
        shape=(int(ds.shape[1]), int(ds.shape[2])),
        transposed=bool(a["transposed"]),
        storage_dtype=str(a["storage_dtype"]),
    )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_truncated(path: Path) -> bool:
    """Whether a cleanly closed file is shorter than the end-of-file its superblock records.

    An SWMR open skips HDF5's own end-of-file check (a live writer may be extending the file), so
    a truncated copy would open and read zeros past its end. Checked only for superblock v2+ (what
    the writer makes) with clear consistency flags (no live or crashed writer).
    """
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 48 or head[:8] != _HDF5_SIGNATURE or head[8] < 2 or head[11] != 0:
        return False
    size = head[9]  # bytes per offset: base address, extension address, end-of-file address
    base = int.from_bytes(head[12 : 12 + size], "little")
    eof = int.from_bytes(head[12 + 2 * size : 12 + 3 * size], "little")
    return os.path.getsize(path) < base + eof


def writer_flagged(path: str | os.PathLike) -> bool:
    """Whether the file's superblock says a writer has it open (or died holding it open).

    A live recorder and a killed one look the same here; callers that wait for new snapshots
    also stop after a quiet period.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
    return len(head) == 12 and head[:8] == _HDF5_SIGNATURE and head[8] >= 2 and head[11] != 0


def _open_h5(path: Path) -> h5py.File:
    """Open read-only; SWMR first so that live and crashed runs open too."""
    if _is_truncated(path):
        raise RunFileError(
            f"{path} is shorter than its HDF5 header records; it is truncated or corrupt "
            "(an interrupted copy?). Re-record it or restore a copy."
        )
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError:
        pass
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(
            f"{path} is an HDF5 file that cannot be opened ({exc}); it is "
            "truncated or corrupt. Re-record it or restore a copy."
        ) from None


def check_header(path: Path, file: h5py.File) -> None:
    """Raise a clear :class:`RunFileError` unless ``file`` is a run this reader understands."""
    name = file.attrs.get("format")
    if name is None:
        raise RunFileError(
            f"{path} is an HDF5 file but not a basis_stability run (it has no "
            "root attribute `format`). Pass a file written by `bstab record`."
        )
    if _plain(name) != fmt.FORMAT_NAME:
        raise RunFileError(
            f"{path} is an HDF5 file of another kind (format {_plain(name)!r}, "
            f"expected {fmt.FORMAT_NAME!r}). Pass a file written by bstab."
        )
    version = _plain(file.attrs.get("format_version", "?"))
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
    for required in ("layers", "snapshots", "metrics/names", "metrics/values"):
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
    """
    path = Path(path)
    if not path.exists():
        raise RunFileError(
            f"No run file at {path}. Check the path; `bstab record` prints where it wrote its run."
        )
    if path.is_dir():
        raise RunFileError(f"Expected a run file but {path} is a directory.")
    if not h5py.is_hdf5(path):
        raise RunFileError(
            f"{path} is not an HDF5 file (no HDF5 signature). Pass a run file "
            "written by `bstab record`."
        )
    file = _open_h5(path)
    try:
        check_header(path, file)
        return Run(path, file)
    except Exception:
        file.close()
        raise
