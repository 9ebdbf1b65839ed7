"""Append snapshots to a run file, crash-safely (spec: checkpoints_spec/FORMAT.md).

Crash safety comes from three rules, each measured on these machines:

1. the file is written in SWMR mode (``libver="latest"``, every dataset created before
   ``swmr_mode = True``), which keeps it consistent on disk at every instant and lets other
   processes read it live;
2. a snapshot is committed by growing ``/snapshots`` *after* all its layer rows and metrics are
   written, and the file is flushed after every snapshot; readers use ``len(/snapshots)``;
3. a new file is built under a temporary name and linked into place only when complete, so a kill
   during creation never leaves a half-made run under the user's path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ConfigError, RunExistsError, RunFileError, RunMismatchError, expected
from ..views import LayerView
from . import format as fmt

log = logging.getLogger(__name__)

_FLAG_ERROR = "consistency flags"  # HDF5's message for a file whose SWMR writer died


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


def _create_skeleton(f: h5py.File, layers: Sequence[LayerView], attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        f.attrs[key] = str(value)  # str(): torch.__version__ is a str subclass h5py rejects
    group = f.create_group("layers", track_order=True)
    disk_dtype = fmt.h5_dtype(attrs["storage_dtype"])
    for view in layers:
        m, n = view.shape
        ds = group.create_dataset(
            view.name, shape=(0, m, n), maxshape=(None, m, n), chunks=(1, m, n), dtype=disk_dtype
        )
        ds.attrs["param_name"] = view.param_name
        ds.attrs["kind"] = view.kind
        ds.attrs["orig_shape"] = np.asarray(view.orig_shape, dtype=np.int64)
        ds.attrs["transposed"] = bool(view.transposed)
        ds.attrs["storage_dtype"] = attrs["storage_dtype"]
    f.create_dataset(
        "snapshots", shape=(0,), maxshape=(None,), chunks=(256,), dtype=fmt.SNAPSHOT_DTYPE
    )
    f.create_dataset("events", shape=(0,), maxshape=(None,), chunks=(16,), dtype=fmt.EVENT_DTYPE)
    metrics = f.create_group("metrics")
    metrics.create_dataset(
        "names", shape=(0,), maxshape=(None,), chunks=(64,), dtype=fmt.NAME_DTYPE
    )
    metrics.create_dataset(
        "values",
        shape=(0, 0),
        maxshape=(None, None),
        chunks=(256, 16),
        dtype="<f8",
        fillvalue=np.nan,
    )


class RunWriter:
    """Writes one run file. Use :meth:`create` or :meth:`resume`, then :meth:`append`.

    Example:
        >>> w = RunWriter.create("run.h5", views, model_class="MLP")  # doctest: +SKIP
        >>> w.append((m.numpy() for m in matrices), step=0, epoch=0.0)  # doctest: +SKIP
        >>> w.close()  # doctest: +SKIP
    """

    def __init__(self, f: h5py.File, path: Path, layers: Sequence[LayerView]) -> None:
        self._f = f
        self.path = path
        self.layers = list(layers)
        self.storage_dtype = str(f.attrs["storage_dtype"])
        self._datasets = [f["layers"][v.name] for v in self.layers]
        self._layouts = [(ds.shape[1:], ds.dtype) for ds in self._datasets]  # (m, n), dtype
        self._index = f["snapshots"]
        self._names_ds = f["metrics/names"]
        self._values_ds = f["metrics/values"]
        self.metric_names = [n.decode() for n in self._names_ds[:]]
        self.n_snapshots = len(self._index)
        self._t0 = time.perf_counter() - (self._index[-1]["wall_time"] if self.n_snapshots else 0)

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
    ) -> RunWriter:
        """Create a new run file; refuses to replace an existing one unless ``force``."""
        path = Path(path)
        _check_dtype(storage_dtype)
        if path.exists() and not force:
            raise RunExistsError(
                f"{path} already exists. Pass force=True (--force) to replace it,"
                " resume it (mode='append'), or choose another path."
            )
        if path.is_dir():
            raise RunFileError(f"Expected the run path to be a file but {path} is a directory.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        f = h5py.File(tmp, "w", libver="latest")
        try:
            _create_skeleton(f, layers, _root_attrs(model_class, storage_dtype, config or {}))
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
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(f, path, layers)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        layers: Sequence[LayerView],
        keep: int | None = None,
        step: int | None = None,
    ) -> RunWriter:
        """Re-open a run to append after its last complete snapshot.

        A half-written last snapshot is dropped. A file whose writer was killed is first
        recovered (its committed snapshots copied into a fresh file that replaces it).

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

        Raises:
            RunMismatchError: the run holds a different layer set or shapes.
        """
        from .reader import open_run

        path = Path(path)
        with open_run(path) as run:  # validates format, version and readability
            recorded = {info.name: info.shape for info in run.layers}
        wanted = {v.name: v.shape for v in layers}
        if recorded != wanted:
            raise RunMismatchError(_mismatch_message(path, recorded, wanted))
        try:
            f = h5py.File(path, "r+", libver="latest")
        except OSError as exc:
            if _FLAG_ERROR not in str(exc):
                raise RunFileError(
                    f"Cannot open {path} for appending: {exc}. Another process may "
                    "be writing it; wait for it to finish."
                ) from None
            recover(path)
            f = h5py.File(path, "r+", libver="latest")
        committed = len(f["snapshots"])
        if keep is not None and keep < 0:
            f.close()
            raise ConfigError(expected("keep", "a snapshot count >= 0", keep, "Use e.g. 1."))
        if keep is not None and keep <= committed:
            keep_steps = f["snapshots"][:keep]["step"]
            # the checkpoint's step, else the last kept snapshot's (-1: unknown, keep all events)
            last = step if step is not None else int(keep_steps[-1]) if keep else -1
            later = _events_after(f, last) if last >= 0 else []
            if keep < committed or later:
                f.close()
                backup = _backup(path, committed)
                f = h5py.File(path, "r+", libver="latest")
                f["snapshots"].resize(keep, axis=0)
                # the abandoned training's decisions go too (the resumed one logs its own again)
                _keep_events(f, later)
                log.warning(
                    "%s: resuming at step %d after snapshot %d (training was rolled back to a "
                    "checkpoint); %d later snapshot(s) and %d later event(s) are dropped from the "
                    "run and kept in %s",
                    path,
                    last,
                    keep - 1,
                    committed - keep,
                    len(later),
                    backup,
                )
                committed = keep
        for ds in f["layers"].values():
            if ds.shape[0] != committed:
                ds.resize(committed, axis=0)
        values = f["metrics/values"]
        if values.shape[0] > committed:
            values.resize(committed, axis=0)
        f.flush()
        f.swmr_mode = True
        return cls(f, path, layers)

    # ----------------------------------------------------------------- writing
    def append(
        self,
        matrices: Iterable[np.ndarray],
        *,
        step: int = -1,
        epoch: float = float("nan"),
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Write one snapshot and commit it.

        Args:
            matrices: one array per layer, in layer order, each of the layer's tall shape and of
                the on-disk dtype (see :func:`basis_stability.store.format.h5_dtype`). It may be a
                generator, so that only one layer is held in memory at a time.
            step: the optimizer step, -1 when unknown.
            epoch: the (possibly fractional) epoch, NaN when unknown.
            metrics: scalar metrics of this snapshot.

        Returns:
            The index of the snapshot written.
        """
        t = self.n_snapshots
        row = self._metric_row(metrics or {})
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
        entry = np.array(
            [(step, epoch, time.perf_counter() - self._t0, time.time())], dtype=fmt.SNAPSHOT_DTYPE
        )
        self._index.resize(t + 1, axis=0)
        self._index[t] = entry[0]  # the commit: readers count rows of /snapshots
        self._f.flush()
        self.n_snapshots = t + 1
        return t

    def log_event(self, event: Mapping[str, Any]) -> bool:
        """Append one decision (a JSON object) to ``/events`` and flush; False when the run
        predates format 1.1 and has no ``/events``."""
        ds = self._f.get("events")
        if ds is None:
            return False
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
        ds.resize(ds.shape[0] + 1, axis=0)
        ds[-1] = text
        self._f.flush()
        return True

    def _metric_row(self, metrics: Mapping[str, float]) -> np.ndarray | None:
        if not metrics and not self.metric_names:
            return None
        for name in metrics:
            if name not in self.metric_names:
                if len(name.encode()) > 128 or "\x00" in name:
                    raise ConfigError(
                        expected(
                            "metrics",
                            "names of at most 128 bytes",
                            name,
                            "Use a shorter metric name.",
                        )
                    )
                self.metric_names.append(name)
                self._names_ds.resize(len(self.metric_names), axis=0)
                self._names_ds[-1] = name.encode()
        row = np.full(len(self.metric_names), np.nan)
        for name, value in metrics.items():
            try:
                row[self.metric_names.index(name)] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    expected(
                        f"metrics[{name!r}]",
                        "a number",
                        value,
                        "Pass a float, an int or a 0-d tensor.",
                    )
                ) from None
        return row

    def close(self) -> None:
        if self._f.id.valid:
            self._f.flush()
            self._f.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mismatch_message(path: Path, recorded: dict, wanted: dict) -> str:
    missing = sorted(set(recorded) - set(wanted))
    extra = sorted(set(wanted) - set(recorded))
    reshaped = sorted(n for n in set(recorded) & set(wanted) if recorded[n] != wanted[n])
    parts = []
    if missing:
        parts.append(f"layers in the run but not selected now: {', '.join(missing[:10])}")
    if extra:
        parts.append(f"layers selected now but not in the run: {', '.join(extra[:10])}")
    for n in reshaped[:10]:
        parts.append(f"{n} was {recorded[n]} and is now {wanted[n]}")
    return (
        f"Cannot resume {path}: the model does not match the recorded layers ("
        + "; ".join(parts)
        + "). Record into a new file, or select the same layers."
    )


def _event_step(row: bytes) -> float | None:
    try:
        s = json.loads(row.decode()).get("step")
    except (ValueError, AttributeError):
        return None
    return s if isinstance(s, (int, float)) and not isinstance(s, bool) else None


def _events_after(f: h5py.File, step: int) -> list[int]:
    """Indices of the events stamped with an optimizer step after ``step`` (those of a
    rolled-back training); events without a step are never counted."""
    ds = f.get("events")
    if ds is None or not len(ds):
        return []
    return [i for i, row in enumerate(ds[:]) if (_event_step(row) or -1) > step]


def _keep_events(f: h5py.File, drop: list[int]) -> None:
    """Remove the events at indices ``drop`` from ``/events``, keeping the others in order."""
    if not drop:
        return
    ds = f["events"]
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


def recover(path: str | os.PathLike) -> int:
    """Rebuild a run whose writer was killed, keeping every committed snapshot.

    HDF5 refuses to re-open for writing a file whose SWMR writer died (its consistency flag stays
    set), but SWMR readers can still read it. This copies the committed snapshots into a fresh
    file beside it and atomically replaces the original; the half-written snapshot, if any, is
    dropped, as every reader drops it.

    Returns:
        The number of snapshots kept.
    """
    from .reader import open_run

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.recover")
    with open_run(path) as run, h5py.File(tmp, "w", libver="latest") as out:
        src = run._file
        for key, value in src.attrs.items():
            out.attrs[key] = value
        group = out.create_group("layers", track_order=True)
        for info in run.layers:
            ds = src["layers"][info.name]
            new = group.create_dataset(
                info.name,
                shape=(run.n_snapshots, *info.shape),
                maxshape=(None, *info.shape),
                chunks=(1, *info.shape),
                dtype=ds.dtype,
            )
            for t in range(run.n_snapshots):
                new[t] = ds[t]
            for key, value in ds.attrs.items():
                new.attrs[key] = value
        out.create_dataset(
            "snapshots", data=src["snapshots"][: run.n_snapshots], maxshape=(None,), chunks=(256,)
        )
        if "events" in src:  # format >= 1.1
            out.create_dataset(
                "events",
                data=src["events"][:],
                maxshape=(None,),
                chunks=(16,),
                dtype=fmt.EVENT_DTYPE,
            )
        metrics = out.create_group("metrics")
        names = src["metrics/names"][:]
        metrics.create_dataset(
            "names", data=names, maxshape=(None,), chunks=(64,), dtype=fmt.NAME_DTYPE
        )
        values = src["metrics/values"][: run.n_snapshots, : len(names)]
        metrics.create_dataset(
            "values",
            data=values,
            maxshape=(None, None),
            chunks=(256, 16),
            dtype="<f8",
            fillvalue=np.nan,
        )
        kept = run.n_snapshots
    os.replace(tmp, path)
    log.warning(
        "Recovered %s after an interrupted writer: kept %d committed snapshots.", path, kept
    )
    return kept
