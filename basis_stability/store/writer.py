"""Append snapshots to a run file, crash-safely (spec: checkpoints_spec/FORMAT.md).

Every group, dataset and attribute it makes is declared in :mod:`.layout`: creating a run,
resuming one and recovering one all build from those tables.

Crash safety comes from three rules, each measured on these machines:

1. the file is written in SWMR mode (``libver="latest"``, every dataset created before
   ``swmr_mode = True``), which keeps it consistent on disk at every instant and lets other
   processes read it live;
2. a snapshot is committed by growing ``/snapshots`` *after* all its layer rows, its state
   rows (biases and buffers, format 1.3) and metrics are written, and the file is flushed after
   every snapshot; readers use ``len(/snapshots)``;
3. a new file is built under a temporary name and linked into place only when complete, so a kill
   during creation never leaves a half-made run under the user's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import (
    ConfigError,
    Message,
    RunExistsError,
    RunFileError,
    RunLockedError,
    RunMismatchError,
    WriteFailedError,
    expected,
    non_negative_int,
)
from ..views import LayerView
from . import format as fmt
from . import layout
from . import state as st
from .h5io import write_digest
from .lock import WriterLock, other_openers
from .paths import refuse_existing

log = logging.getLogger(__name__)

_FLAG_ERROR = "consistency flags"  # HDF5's message for a file whose SWMR writer died
_EXISTS_FIX = Message(
    "Pass `mode='overwrite'` to replace it, `mode='append'` to resume it, or choose another path",
    ["mode"],
)


def _check_dtype(storage_dtype: str) -> str:
    if storage_dtype not in fmt.STORAGE_DTYPES:
        raise ConfigError(
            expected(
                "dtype",
                f"one of {', '.join(fmt.STORAGE_DTYPES)}",
                storage_dtype,
                "float32 is exact; the others halve the file.",
            )
        )
    return storage_dtype


def _root_attrs(model_class: str, storage_dtype: str, config: Mapping[str, Any]) -> dict:
    import torch

    from .. import __version__

    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "model_class": model_class,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "storage_dtype": storage_dtype,
        "config": json.dumps(dict(config), sort_keys=True, default=str),
    }


# ----------------------------------------------------------------- building from the layout
def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _create_tables(f: h5py.File, rows: Mapping[str, np.ndarray | None] | None = None) -> None:
    """Every table of :data:`layout.TABLES`, empty or holding ``rows[path]`` (a recovery)."""
    for spec in layout.TABLES:
        spec.create(f, data=(rows or {}).get(spec.path))


def _layer_attrs(view: LayerView, storage_dtype: str) -> dict[str, Any]:
    """The values of :data:`layout.LAYER_ATTRS` for one recorded layer."""
    return {
        "param_name": view.param_name,
        "kind": view.kind,
        "orig_shape": view.orig_shape,
        "transposed": view.transposed,
        "orientation": view.orientation,
        "storage_dtype": storage_dtype,
    }


def _create_skeleton(
    f: h5py.File,
    layers: Sequence[LayerView],
    attrs: Mapping[str, Any],
    state: st.StateIndex | None = None,
) -> None:
    """An empty run: the root attributes, one empty dataset per layer, ``/state`` (when
    ``state`` is given) and the tables, as :mod:`.layout` declares them."""
    layout.write_attrs(f, layout.ROOT_ATTRS, attrs)
    group = layout.LAYERS.create(f)
    storage = attrs["storage_dtype"]
    for view in layers:
        ds = layout.LAYER.create(
            group,
            fmt.encode_name(view.name),
            shape=(0, *view.shape),
            dtype=fmt.h5_dtype(storage),
        )
        layout.write_attrs(ds, layout.LAYER_ATTRS, _layer_attrs(view, storage))
    if state is not None:
        st.create_group(f, state)
    _create_tables(f)
    write_digest(f)  # last: it covers every name and attribute above


def _cause(exc: BaseException) -> str:
    """The operating system's words from an HDF5 write error ("No space left on device")."""
    text = str(exc)
    match = re.search(r"error message = '([^']+)'", text)
    if match:
        return match.group(1)
    return text.split("\n")[0][:200]


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return None
    return st.f_bavail * st.f_frsize


class RunWriter:
    """Writes one run file. Use :meth:`create` or :meth:`resume`, then :meth:`append`.

    A writer holds the run's writer lock (:mod:`basis_stability.store.lock`) until it closes, so
    a second writer of the same run is refused instead of destroying it. A write error (a full
    disk) commits nothing: the file keeps every earlier snapshot, the writer stops, and the
    error names the path and the cause.

    Example:
        >>> w = RunWriter.create("run.h5", views, model_class="MLP")  # doctest: +SKIP
        >>> w.append((m.numpy() for m in matrices), step=0, epoch=0.0)  # doctest: +SKIP
        >>> w.close()  # doctest: +SKIP
    """

    def __init__(
        self, f: h5py.File, path: Path, layers: Sequence[LayerView], lock: WriterLock
    ) -> None:
        self._f = f
        self._lock = lock
        self.path = path
        self.layers = list(layers)
        self.storage_dtype = _text(f.attrs["storage_dtype"])
        encode = fmt.encode_name if _names_encoded(f) else str
        self._datasets = [f[layout.LAYERS.path][encode(v.name)] for v in self.layers]
        self._layouts = [(ds.shape[1:], ds.dtype) for ds in self._datasets]  # (m, n), dtype
        self.state = _state_index(f)
        group = f.get(st.GROUP)
        self._state_ds = st.value_datasets(group, self.state) if group is not None else []
        self._snapshot_bytes = sum(
            ds.dtype.itemsize * int(np.prod(ds.shape[1:])) for ds in self._datasets + self._state_ds
        )
        self._index = f[layout.SNAPSHOTS.path]
        self._names_ds = f[layout.METRIC_NAMES.path]
        self._values_ds = f[layout.METRIC_VALUES.path]
        self.metric_names = [n.decode() for n in self._names_ds[:]]
        self.n_snapshots = len(self._index)
        self._t0 = time.perf_counter() - (self._index[-1]["wall_time"] if self.n_snapshots else 0)
        self._failed: str | None = None  # why the writer stopped, after a write error
        self._has_events = layout.EVENTS.path in f  # format 1.1 and later

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layers: Sequence[LayerView],
        *,
        model_class: str,
        storage_dtype: str = "float32",
        config: Mapping[str, Any] | None = None,
        force: bool = False,
        state: st.StateIndex | None = None,
    ) -> RunWriter:
        """Create a new run file; refuses to replace an existing one unless ``force``.

        ``state`` (format 1.3) declares the small state-dict entries every snapshot stores
        (biases, norm weights, buffers) and the model's state-dict keys; see
        :func:`basis_stability.store.state.plan`. None: the run has no ``/state``.

        Raises:
            RunExistsError: the file exists and ``force`` is False.
            RunLockedError: another writer holds the run (also with ``force``).
        """
        path = Path(path)
        _check_dtype(storage_dtype)
        if path.is_dir():
            raise RunFileError(f"Expected the run path to be a file but {path} is a directory.")
        if not force:
            refuse_existing(path, "path", _EXISTS_FIX)
        _make_parent(path)
        lock = WriterLock.acquire(path, "overwrite" if force else "create")
        try:
            attrs = _root_attrs(model_class, storage_dtype, config or {})
            return cls._create_locked(path, layers, lock, attrs, state, force)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create_locked(cls, path, layers, lock, attrs, state, force):
        if not force:  # it may have appeared while we took the lock
            refuse_existing(path, "path", _EXISTS_FIX)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            f = h5py.File(tmp, "w", libver="latest")
        except OSError as exc:
            raise _write_error(path, "create", exc) from None
        try:
            _create_skeleton(f, layers, attrs, state)
            f.flush()
            f.swmr_mode = True
            if force:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # atomic and never replaces an existing file
                os.unlink(tmp)
        except FileExistsError:
            f.close()
            tmp.unlink(missing_ok=True)
            raise RunExistsError(
                f"{path} appeared while it was being created; nothing was "
                "overwritten. Choose another path."
            ) from None
        except (OSError, RuntimeError) as exc:
            _abandon(f)
            tmp.unlink(missing_ok=True)
            raise _write_error(path, "create", exc) from None
        except BaseException:
            _abandon(f)
            tmp.unlink(missing_ok=True)
            raise
        return cls(f, path, layers, lock)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        layers: Sequence[LayerView],
        keep: int | None = None,
        step: int | None = None,
        state: Sequence[st.StateEntry] | None = None,
    ) -> RunWriter:
        """Re-open a run to append after its last complete snapshot.

        A half-written last snapshot is dropped. A file whose writer was killed is first
        recovered (its committed snapshots copied into a fresh file that replaces it); a file
        whose writer is alive is refused.

        Args:
            path: the run file.
            layers: the layer views of the model being recorded (must match the run's).
            keep: resume after the first ``keep`` snapshots (training was rolled back to a
                checkpoint taken then). Later snapshots, and the ``/events`` stamped with a
                step after the last kept snapshot's, belong to the abandoned training: the
                whole file is first copied to a backup beside it (never overwritten), so nothing
                recorded is lost, and then they are dropped from the run.
            step: with ``keep``, the checkpoint's optimizer step: events after it are dropped
                (default: the last kept snapshot's step).
            state: the small state-dict entries the model being recorded has (keys, dtypes,
                shapes); when the run stores state, they must be the run's. None: not checked
                (then :meth:`append` must still be given the run's :attr:`state` rows).

        Raises:
            RunLockedError: another process is writing the run.
            RunMismatchError: the run holds a different layer set or shapes, or other state.
        """
        path = Path(path)
        if keep is not None:
            keep = non_negative_int("keep", keep, "Use e.g. 1.", wanted="a snapshot count >= 0")
        lock = WriterLock.acquire(path, "append to")
        try:
            f = _open_for_append(path, layers, lock, state)
            try:
                f, committed = _roll_back(f, path, keep, step)
                _truncate_to(f, committed)
                f.flush()
                f.swmr_mode = True
            except BaseException:
                _abandon(f)
                raise
            return cls(f, path, layers, lock)
        except BaseException:
            lock.release()
            raise

    # ----------------------------------------------------------------- writing
    def append(
        self,
        matrices: Iterable[np.ndarray],
        *,
        step: int = -1,
        epoch: float = float("nan"),
        metrics: Mapping[str, float] | None = None,
        state: Mapping[str, np.ndarray] | Iterable[np.ndarray] | None = None,
    ) -> int:
        """Write one snapshot and commit it.

        The layer rows, state rows and metrics are written and flushed first; only then is the
        snapshot committed (``/snapshots`` grown) and flushed again, so a committed snapshot's
        data, its state included, is always in the file.

        Args:
            matrices: one array per layer, in layer order, each of the layer's tall shape and of
                the on-disk dtype (see :func:`basis_stability.store.format.h5_dtype`). It may be a
                generator, so that only one layer is held in memory at a time.
            step: the optimizer step, -1 when unknown.
            epoch: the (possibly fractional) epoch, NaN when unknown.
            metrics: scalar metrics of this snapshot.
            state: required when the run stores state (:attr:`state` has entries): either
                ``{key: array}`` of every entry (in the on-disk dtype: bfloat16 as uint16 bits,
                bool as uint8), or one packed 1-D row per dtype in ``state.layout()`` order
                (what the recorder passes, a generator too).

        Returns:
            The index of the snapshot written.

        Raises:
            WriteFailedError: the disk is full (checked before writing) or a write failed;
                nothing of this snapshot is committed and the writer is closed.
        """
        self._check_usable()
        t = self.n_snapshots
        if self._state_ds and state is None:
            raise ConfigError(
                f"Expected the state rows of snapshot {t} ({len(self.state.entries)} entries: "
                f"biases, buffers) but got none: {self.path} stores them with every snapshot. "
                "Pass state={key: array}, or record with the Recorder, which does."
            )
        self._check_space(t)
        try:
            row = self._metric_row(metrics or {})  # may grow /metrics/names: a write too
            self._write_rows(t, matrices, row)
            self._write_state(t, state)
            self._f.flush()  # the data reaches the file before the commit below
            entry = np.array(
                [(step, epoch, time.perf_counter() - self._t0, time.time())],
                dtype=fmt.SNAPSHOT_DTYPE,
            )
            self._index.resize(t + 1, axis=0)
            self._index[t] = entry[0]  # the commit: readers count rows of /snapshots
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._fail(f"writing snapshot {t}", exc) from None
        self.n_snapshots = t + 1
        return t

    def _write_rows(self, t: int, matrices: Iterable[np.ndarray], row: np.ndarray | None) -> None:
        for ds, (shape, dtype), arr in zip(self._datasets, self._layouts, matrices, strict=True):
            if arr.shape != shape:
                raise ConfigError(
                    f"Expected layer {ds.name} to be a {shape} matrix but "
                    f"got {arr.shape}. The model changed shape since the run began."
                )
            if arr.dtype.kind != dtype.kind:  # e.g. float32 values into bfloat16's uint16 bits
                raise ConfigError(
                    f"Expected layer {ds.name} to be {dtype} (storage dtype "
                    f"{self.storage_dtype}) but got {arr.dtype}. Convert with to_storage()."
                )
            ds.id.set_extent((t + 1, *shape))  # rows beyond t (a resumed half-write) are gone
            ds.write_direct(np.ascontiguousarray(arr), dest_sel=np.s_[t])
        if row is not None:
            if self._values_ds.shape != (t + 1, len(self.metric_names)):
                self._values_ds.resize((t + 1, len(self.metric_names)))
            self._values_ds[t] = row

    def _write_state(self, t: int, state: Mapping[str, np.ndarray] | Iterable | None) -> None:
        """Write the state rows of snapshot ``t`` (in the same data phase as the layers)."""
        if not self._state_ds:
            return
        layout = self.state.layout()
        if isinstance(state, Mapping):
            try:
                state = [st.pack(group, state, dtype) for dtype, group, _ in layout]
            except KeyError as exc:
                raise ConfigError(
                    f"Expected state entry {exc.args[0]!r} in snapshot {t} of {self.path} "
                    "but it is missing; every snapshot stores the run's state entries."
                ) from None
            except ValueError as exc:
                raise ConfigError(f"{exc}. The model changed since the run began.") from None
        for ds, (dtype, _, width), arr in zip(self._state_ds, layout, state, strict=True):
            if arr.shape != (width,) or arr.dtype != ds.dtype:  # exact: no silent casts
                raise ConfigError(
                    f"Expected the {dtype} state row of {self.path} to be {width} values of "
                    f"{ds.dtype} but got {arr.dtype} {arr.shape}. The model changed since the "
                    "run began."
                )
            ds.id.set_extent((t + 1, width))
            ds.write_direct(np.ascontiguousarray(arr), dest_sel=np.s_[t])

    def check_ready(self) -> None:
        """Raise now what :meth:`append` would raise before writing anything of the next
        snapshot: the writer stopped after a write error, or the disk has no room for it.

        The recorder calls it on the training thread before it hands a snapshot to its
        background writer, so that these errors come from the call that caused them. It makes
        no HDF5 call (one would wait for the write in flight); :meth:`append` checks again.
        """
        self._check_stopped()
        self._check_space(self.n_snapshots)

    def _check_stopped(self) -> None:
        if self._failed is not None:
            raise WriteFailedError(
                f"The writer of {self.path} stopped after an earlier write error "
                f"({self._failed}); the run keeps its {self.n_snapshots} committed snapshots. "
                "Fix the cause, then resume it with mode='append'."
            )

    def _check_usable(self) -> None:
        self._check_stopped()
        if not self._f.id.valid:
            raise RunFileError(
                f"The writer of {self.path} is closed; open a new one (mode='append') to add "
                "snapshots."
            )

    def _check_space(self, t: int) -> None:
        """Refuse a snapshot the disk cannot hold, before writing any of it."""
        free = _free_bytes(self.path.parent)
        need = self._snapshot_bytes + (1 << 20)  # the rows plus room for metadata
        if free is not None and free < need:  # the writer stays usable once space is freed
            raise WriteFailedError(
                f"No space left for snapshot {t} of {self.path}: it needs about "
                f"{_mib(need)} and the disk has {_mib(free)} free. The run keeps its {t} "
                "committed snapshots; free space, then resume it with mode='append'."
            )

    def _fail(self, what: str, exc: BaseException) -> WriteFailedError:
        """Stop after a write error: leave the file as it last reached the disk."""
        self._failed = _cause(exc)
        _abandon(self._f)
        self._lock.release()
        committed = _committed_count(self.path)
        return WriteFailedError(
            f"{what.capitalize()} to {self.path} failed: {self._failed}. Nothing of it was "
            f"committed; the run keeps its {committed} earlier snapshots. Fix the cause (free "
            "space), then resume it with mode='append'."
        )

    @property
    def last_step(self) -> int | None:
        """The optimizer step of the last committed snapshot (-1: unknown), None when the run
        has none: where a resumed recorder counts steps on from."""
        if not self.n_snapshots:
            return None
        return int(self._index[self.n_snapshots - 1]["step"])

    @property
    def has_events(self) -> bool:
        """Whether the run has ``/events`` (format 1.1 and later)."""
        return self._has_events

    def log_event(self, event: Mapping[str, Any]) -> bool:
        """Append one decision (a JSON object) to ``/events`` and flush; False when the run
        predates format 1.1 and has no ``/events``."""
        self._check_usable()
        if not self.has_events:
            return False
        self.write_event(encode_event(event))
        return True

    def write_event(self, text: bytes) -> None:
        """Append one event already encoded by :func:`encode_event` to ``/events`` and flush."""
        self._check_usable()
        ds = self._f[layout.EVENTS.path]
        try:
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = text
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._fail("logging an event", exc) from None

    def _metric_row(self, metrics: Mapping[str, float]) -> np.ndarray | None:
        if not metrics and not self.metric_names:
            return None
        values = check_metrics(metrics)  # refuse a bad name or value before growing the names
        for name in values:
            if name not in self.metric_names:
                self.metric_names.append(name)
                self._names_ds.resize(len(self.metric_names), axis=0)
                self._names_ds[-1] = name.encode()
        row = np.full(len(self.metric_names), np.nan)
        for name, value in values.items():
            row[self.metric_names.index(name)] = value
        return row

    @property
    def closed(self) -> bool:
        return not self._f.id.valid

    def close(self) -> None:
        """Flush, close and release the writer lock (idempotent)."""
        try:
            if self._f.id.valid:
                try:
                    self._f.flush()
                except (OSError, RuntimeError) as exc:
                    raise self._fail("closing the run", exc) from None
                self._f.close()
        finally:
            self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A snapshot's metrics as plain floats (a 0-d tensor read now), their names checked.

    Raises:
        ConfigError: a name longer than 128 bytes (or holding NUL), or a value that is no number.
    """
    values = {}
    for name, value in metrics.items():
        if len(name.encode()) > 128 or "\x00" in name:
            raise ConfigError(
                expected(
                    "metrics", "names of at most 128 bytes", name, "Use a shorter metric name."
                )
            )
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                expected(
                    f"metrics[{name!r}]", "a number", value, "Pass a float, an int or a 0-d tensor."
                )
            ) from None
    return values


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One event as the UTF-8 JSON that ``/events`` stores (keys sorted).

    Raises:
        ConfigError: the JSON is longer than an ``/events`` row holds.
    """
    text = json.dumps(dict(event), sort_keys=True, default=str).encode()
    if len(text) > fmt.event_bytes():
        raise ConfigError(
            expected(
                "event",
                f"at most {fmt.event_bytes()} bytes of JSON",
                f"{len(text)} bytes",
                "Log fewer numbers per event.",
            )
        )
    return text


def _names_encoded(f: h5py.File) -> bool:
    return fmt.at_least(_text(f.attrs.get("format_version", "")), fmt.NAMES_ENCODED_SINCE)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _write_error(path: Path, action: str, exc: BaseException) -> RunFileError:
    return WriteFailedError(
        f"Cannot {action} {path}: {_cause(exc)}. Free space or choose a writable `path`; "
        "nothing was written.",
        argument="path",
    )


def _make_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise RunFileError(
            f"Cannot write {path}: {parent} is a file, not a folder. Choose another path."
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFileError(
            f"Cannot create the folder {parent} for {path} ({exc.strerror}). Choose a "
            "writable path."
        ) from None


def _abandon(f: h5py.File) -> None:
    """Close an HDF5 file after a write error without letting HDF5 write again.

    After a failed flush HDF5 still holds dirty metadata; closing normally retries those writes
    (which fail again, then crash the interpreter at exit). The file's descriptor is pointed at
    /dev/null first, so the file on disk stays exactly as it last reached the disk: consistent
    (SWMR orders its writes as for a crash) and holding every earlier committed snapshot.
    """
    if not f.id.valid:
        return
    try:
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, RuntimeError, ValueError, TypeError):
        pass
    with contextlib.suppress(Exception):  # what HDF5 says closing onto /dev/null is moot
        f.close()


def _committed_count(path: Path) -> int | str:
    from .reader import open_run

    try:
        with open_run(path) as run:
            return run.n_snapshots
    except Exception:
        return "all"


def _open_for_append(
    path: Path,
    layers: Sequence[LayerView],
    lock: WriterLock,
    state: Sequence[st.StateEntry] | None = None,
) -> h5py.File:
    """Open a run for writing under its lock: layers and state checked, a dead writer's file
    recovered."""
    from .reader import open_run

    with open_run(path) as run:  # validates format, version and readability
        recorded = {info.name: info.shape for info in run.layers}
        layouts = {info.name: (info.transposed, info.orientation) for info in run.layers}
        stored = {e.key: (e.dtype, e.shape) for e in run.state_index.entries}
    wanted = {v.name: v.shape for v in layers}
    if recorded != wanted:
        raise RunMismatchError(_mismatch_message(path, recorded, wanted))
    if stored and state is not None:
        offered = {e.key: (e.dtype, e.shape) for e in state}
        if offered != stored:
            raise RunMismatchError(_state_mismatch_message(path, stored, offered))
    flipped = [v.name for v in layers if layouts[v.name] != (v.transposed, v.orientation)]
    if flipped:  # same shapes, other layout (a square (in, out) weight): appending would mix them
        raise RunMismatchError(
            f"{path} stores layer(s) {', '.join(flipped[:5])} in another orientation than this "
            "model gives them (e.g. recorded before transformers' Conv1D was known as (in, out)); "
            "appending would mix two layouts. Record to a new run file."
        )
    try:
        return h5py.File(path, "r+", libver="latest")
    except OSError as exc:
        if _FLAG_ERROR not in str(exc):
            raise RunFileError(f"Cannot open {path} for appending: {exc}.") from None
    # we hold the lock, so the writer that left the flag set is dead
    recover(path, _lock=lock)
    return h5py.File(path, "r+", libver="latest")


def _roll_back(
    f: h5py.File, path: Path, keep: int | None, step: int | None
) -> tuple[h5py.File, int]:
    """Drop the snapshots after ``keep`` (and later events), after backing the closed file up
    (byte for byte); returns the re-opened file and its committed count."""
    committed = len(f[layout.SNAPSHOTS.path])
    if keep is None or keep > committed:
        return f, committed
    keep_steps = f[layout.SNAPSHOTS.path][:keep]["step"]
    # the checkpoint's step, else the last kept snapshot's (-1: unknown, keep all events)
    last = step if step is not None else int(keep_steps[-1]) if keep else -1
    later = _events_after(f, last) if last >= 0 else []
    if keep == committed and not later:
        return f, committed
    f.close()
    backup = _backup(path, committed)
    f = h5py.File(path, "r+", libver="latest")
    f[layout.SNAPSHOTS.path].resize(keep, axis=0)
    _keep_events(f, later)  # the abandoned training's decisions go (the resumed one logs anew)
    log.warning(
        "%s: resuming at step %d after snapshot %d (training was rolled back to a checkpoint); "
        "%d later snapshot(s) and %d later event(s) are dropped from the run and kept in %s",
        path,
        last,
        keep - 1,
        committed - keep,
        len(later),
        backup,
    )
    return f, keep


def _snapshot_rows(f: h5py.File) -> list[h5py.Dataset]:
    """Every dataset whose rows are snapshots' (:attr:`layout.DatasetSpec.per_snapshot`): each
    layer, each ``/state/<dtype>`` the state index lists, and such tables (``/metrics/values``)."""
    group = f.get(st.GROUP)
    found = list(f[layout.LAYERS.path].values())
    found += st.value_datasets(group, _state_index(f)) if group is not None else []
    return found + [f[spec.path] for spec in layout.TABLES if spec.per_snapshot]


def _truncate_to(f: h5py.File, committed: int) -> None:
    """Drop the rows of an uncommitted snapshot (every reader already ignores them)."""
    for ds in _snapshot_rows(f):
        if ds.shape[0] > committed:  # never fewer: the reader refused such a run
            ds.resize(committed, axis=0)


def _differences(
    before: dict, now: dict, only_before: str, only_now: str, changed: Callable[[Any], str]
) -> str:
    """The first ten names in each way two name -> description maps differ, joined by ``; ``."""
    parts = []
    missing = sorted(set(before) - set(now))
    extra = sorted(set(now) - set(before))
    if missing:
        parts.append(f"{only_before}: {', '.join(missing[:10])}")
    if extra:
        parts.append(f"{only_now}: {', '.join(extra[:10])}")
    for n in sorted(n for n in set(before) & set(now) if before[n] != now[n])[:10]:
        parts.append(f"{n} was {changed(before[n])} and is now {changed(now[n])}")
    return "; ".join(parts)


_LAYERS_DIFFER = (
    "layers in the run but not selected now",
    "layers selected now but not in the run",
)
_STATE_DIFFERS = ("in the run but not in the model", "in the model but not in the run")


def _mismatch_message(path: Path, recorded: dict, wanted: dict) -> str:
    parts = _differences(recorded, wanted, *_LAYERS_DIFFER, str)
    return (
        f"Cannot resume {path}: the model does not match the recorded layers ({parts}). "
        "Record into a new file, or select the same layers."
    )


def _state_mismatch_message(path: Path, stored: dict, offered: dict) -> str:
    parts = _differences(
        stored, offered, *_STATE_DIFFERS, lambda dtype_shape: "{} {}".format(*dtype_shape)
    )
    return (
        f"Cannot resume {path}: the model's biases and buffers do not match the recorded state "
        f"({parts}). Record into a new file, or resume with the model the run was recorded from."
    )


def _state_index(f: h5py.File) -> st.StateIndex:
    """The run's ``/state/index`` (an empty index when the run has no ``/state``)."""
    group = f.get(st.GROUP)
    if group is None:
        return st.StateIndex()
    return st.StateIndex.from_json(st.index_dataset(group)[:].tobytes())


def _event_step(row: bytes) -> float | None:
    try:
        s = json.loads(row.decode()).get("step")
    except (ValueError, AttributeError):
        return None
    return s if isinstance(s, (int, float)) and not isinstance(s, bool) else None


def _events_after(f: h5py.File, step: int) -> list[int]:
    """Indices of the events stamped with an optimizer step after ``step`` (those of a
    rolled-back training); events without a step are never counted."""
    ds = f.get(layout.EVENTS.path)
    if ds is None or not len(ds):
        return []
    return [i for i, row in enumerate(ds[:]) if (_event_step(row) or -1) > step]


def _keep_events(f: h5py.File, drop: list[int]) -> None:
    """Remove the events at indices ``drop`` from ``/events``, keeping the others in order."""
    if not drop:
        return
    ds = f[layout.EVENTS.path]
    gone = set(drop)
    kept = [row for i, row in enumerate(ds[:]) if i not in gone]
    if kept:
        ds[: len(kept)] = np.array(kept, dtype=ds.dtype)
    ds.resize(len(kept), axis=0)


def _backup(path: Path, committed: int) -> Path:
    """Copy ``path`` to a new file beside it (never replacing one); returns the copy's path."""
    import shutil

    for i in range(1000):
        suffix = f"-{i}" if i else ""
        dest = path.with_name(f"{path.stem}.before-resume-{committed}{suffix}{path.suffix}")
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
            shutil.copyfile(path, tmp)
            os.link(tmp, dest)  # atomic, and never replaces a file that appeared meanwhile
            os.unlink(tmp)
            return dest
    raise RunFileError(f"Cannot find a free backup name beside {path}; remove old backups.")


def recover(path: str | os.PathLike, *, _lock: WriterLock | None = None) -> int:
    """Rebuild a run whose writer was killed, keeping every committed snapshot.

    HDF5 refuses to re-open for writing a file whose SWMR writer died (its consistency flag stays
    set), but SWMR readers can still read it. This copies the committed snapshots into a fresh
    file beside it and atomically replaces the original; the half-written snapshot, if any, is
    dropped, as every reader drops it. It refuses a run whose writer is alive (it holds the
    writer lock) and one that another process has open (it would keep reading the old file).

    Returns:
        The number of snapshots kept.

    Raises:
        RunLockedError: a writer is alive, or another process has the file open.
    """
    path = Path(path)
    lock = _lock or WriterLock.acquire(path, "recover")
    try:
        openers = other_openers(path)
        if openers:
            raise RunLockedError(
                f"Cannot recover {path}: process(es) {', '.join(map(str, openers[:5]))} have it "
                "open, and recovery replaces the file. Close them (e.g. an analysis that "
                "follows the run), then retry; nothing was changed."
            )
        kept = _copy_committed(path)
    finally:
        if _lock is None:
            lock.release()
    log.warning(
        "Recovered %s after an interrupted writer: kept %d committed snapshots.", path, kept
    )
    return kept


def _copy_committed(path: Path) -> int:
    from .reader import open_run

    tmp = path.with_name(f".{path.name}.{os.getpid()}.recover")
    free = _free_bytes(path.parent)
    if free is not None and free < os.path.getsize(path) + (1 << 20):
        raise WriteFailedError(
            f"Cannot recover {path}: the copy needs about {_mib(os.path.getsize(path))} and the "
            f"disk has {_mib(free)} free. Free space, then retry; nothing was changed."
        )
    try:
        with open_run(path) as run, h5py.File(tmp, "w", libver="latest") as out:
            _copy_run(run, out)
            kept = run.n_snapshots
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RunFileError):
            raise
        raise WriteFailedError(
            f"Cannot recover {path}: writing the copy failed ({_cause(exc)}); the run is "
            "unchanged. Fix the cause, then retry."
        ) from None
    os.replace(tmp, path)
    return kept


def _copy_attrs(src: h5py.HLObject, dest: h5py.HLObject) -> None:
    """Every attribute as stored (a recovered run keeps its names, attributes and digest)."""
    for key, value in src.attrs.items():
        dest.attrs[key] = value


def _copy_run(run: Any, out: h5py.File) -> None:
    """The committed part of an open run, copied into an empty file built from :mod:`.layout`
    (stored names and attributes kept)."""
    from .reader import read_checked

    src = run.h5
    n = run.n_snapshots
    _copy_attrs(src, out)
    group = layout.LAYERS.create(out)
    _copy_attrs(src[layout.LAYERS.path], group)  # the metadata digest (format 1.2)
    for stored, ds in src[layout.LAYERS.path].items():
        new = layout.LAYER.create(group, stored, shape=(n, *ds.shape[1:]), dtype=ds.dtype)
        for t in range(n):  # a damaged row is a DamagedRunError, not a failed write
            new[t] = read_checked(ds, t, run.path, f"layer {stored} snapshot {t}")
        _copy_attrs(ds, new)
    if st.GROUP in src:
        _copy_state(run, out)
    _create_tables(out, _committed_tables(src, n))


def _committed_tables(src: h5py.File, n: int) -> dict[str, np.ndarray | None]:
    """The rows of each table that a copy of the first ``n`` snapshots keeps."""
    names = src[layout.METRIC_NAMES.path][:]
    events = src.get(layout.EVENTS.path)  # format >= 1.1; a 1.0 run's copy gains an empty one
    return {
        layout.SNAPSHOTS.path: src[layout.SNAPSHOTS.path][:n],
        layout.EVENTS.path: None if events is None else events[:],
        layout.METRIC_NAMES.path: names,
        layout.METRIC_VALUES.path: src[layout.METRIC_VALUES.path][:n, : len(names)],
    }


def _copy_state(run: Any, out: h5py.File) -> None:
    """The committed rows of ``/state`` (format 1.3), names and attributes kept."""
    index = run.state_index  # checked by the reader
    src = run.h5[st.GROUP]
    group = st.create_group(out, index, raw=run.state_index_bytes())
    _copy_attrs(src, group)
    _copy_attrs(src[st.INDEX], group[st.INDEX])
    for dtype, _, _ in index.layout():
        new = group[dtype]
        new.resize(run.n_snapshots, axis=0)
        for t in range(run.n_snapshots):  # a damaged row is a DamagedRunError
            new[t] = run.state_row(dtype, t)
        _copy_attrs(src[dtype], new)
