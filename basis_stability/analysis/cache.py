"""The engine's sidecar cache: per (layer, snapshot) its singular values, right singular vectors
and route, and per layer the pairs already measured (S and cumulative overlaps).

The cache (``RUN.bstab-cache-<mode>-<dtype>.h5`` beside the run, or a path you choose) holds no
polar basis: ``B`` (as large as the run itself) is rebuilt from the run's weights and the cached
``V`` when a pair not yet measured needs it (:func:`~.decompose.bases`), and a re-analysis whose
pairs are all cached reads neither the weights nor ``V``. Re-analysing a run only decomposes
snapshots the cache lacks, so a run that is still being recorded costs only its new snapshots
(and the pairs that involve them). The recording itself is never modified.

A cache is trusted only when it names the same run (creation time, model, layers and shapes, and
the first snapshot's commit time), the same cache version and the same settings; each cached
snapshot must also carry the run's own commit time for that snapshot, and each cached pair the
commit times of both its snapshots. Anything else is rebuilt, never reused; a file at a chosen
``cache_path`` that is not a cache (or the run itself) is never deleted. Every cache dataset
carries a Fletcher-32 checksum and an entry's data is flushed before its commit marker, so
damaged or half-written data is rebuilt, never used; a cache that cannot be written (a full
disk) is removed and the analysis goes on without one, with a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import ConfigError, RunFileError, expected
from ..store.format import encode_name
from ..store.reader import LayerInfo, Run
from .config import CACHE_VERSION, EngineConfig
from .decompose import ROUTE_NAMES, Decomposition, PairValues, vector_dtype

log = logging.getLogger(__name__)

CACHE_FORMAT = "basis_stability.svd-cache"
_NOT_A_CACHE = "not a basis_stability SVD cache"
_ROWS = ("t_id", "fro2", "s", "route")  # per snapshot, both modes
_EXACT = _ROWS + ("V",)  # plus V64 (the float64 ones) when V holds float32
_APPROX = _ROWS + ("U", "V")
_PAIRS = ("pair_id", "pair_S", "pair_L", "pair_R")
_WRITE_ERRORS = (OSError, RuntimeError)  # h5py raises either for a failed write or flush
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # and these for damaged files


def run_identity(run: Run) -> str:
    """A fingerprint of the run a cache belongs to.

    ``created`` has one-second resolution, so two runs of one model started in the same second
    would share it; the first snapshot's commit time (microseconds, kept by resume and recovery)
    tells them apart.
    """
    a = run.attrs
    layers = [(i.name, i.shape, i.storage_dtype) for i in run.layers]
    first = run.index()["unix_time"][:1].tolist()
    text = json.dumps(
        [a.get("created"), a.get("model_class"), a.get("format_version"), layers, first]
    )
    return hashlib.sha1(text.encode()).hexdigest()


def default_cache_path(run_path: Path, cfg: EngineConfig) -> Path:
    """``RUN.bstab-cache-exact-float32.h5`` beside the run: one file per SVD mode and dtype, so
    switching modes never throws away another mode's work."""
    return run_path.with_name(f"{run_path.stem}.bstab-cache-{cfg.svd}-{cfg.svd_dtype}.h5")


class CacheDamagedError(RunFileError):
    """A cache entry failed its checksum or could not be read; the analysis rebuilds the cache."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(
            f"the SVD cache {path} failed its checksum or could not be read ({cause}). "
            "Delete it (it is rebuilt) or pass `cache=False`.",
            argument="cache",
        )
        self.cause = cause


def _cause(exc: BaseException) -> str:
    """The operating system's words for a failed HDF5 call, e.g. 'No space left on device'."""
    if getattr(exc, "errno", None):
        return os.strerror(exc.errno)
    found = re.search(r"error message = '([^']*)'", str(exc))
    return found.group(1) if found else str(exc).splitlines()[0]


def _close_quietly(f: h5py.File | None) -> None:
    """Close ``f`` if it is open; a file whose last flush failed may refuse, which is ignored."""
    try:
        if f is not None and f.id.valid:
            f.close()
    except _WRITE_ERRORS as exc:
        log.debug("closing a failed cache file: %s", exc)


class SVDCache:
    """The sidecar cache of one run (or an in-memory stand-in when caching is off or failed).

    An entry counts only once complete: its data is written and flushed before its commit marker
    (the run's ``t_id`` of that snapshot) is. Every dataset carries a Fletcher-32 checksum; an
    entry that fails it makes the analysis rebuild the cache. A write that fails (a full disk)
    removes the cache and the analysis goes on without one. ``notes`` says what happened.
    """

    def __init__(self, run: Run, cfg: EngineConfig) -> None:
        self.run, self.cfg = run, cfg
        self.identity = run_identity(run)
        self.settings = json.dumps(cfg.settings(), sort_keys=True)
        self.memory: dict[str, dict[int, Decomposition]] = {}
        self.pair_memory: dict[str, dict[tuple[float, float], PairValues]] = {}
        self._handles: dict[str, dict[str, h5py.Dataset]] = {}
        self.file: h5py.File | None = None
        self.path: Path | None = None
        self.notes: list[str] = []
        self.dropped = False  # the file failed mid-analysis: what it held must be recomputed
        if cfg.cache:
            self.path = (
                Path(cfg.cache_path) if cfg.cache_path else default_cache_path(run.path, cfg)
            )
            self.file = self._open()

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.warning(text)

    def _open(self) -> h5py.File | None:
        path = self.path
        if path.exists():
            self._refuse_foreign(path)
            if _locked(path):  # another analysis is using it: leave it alone
                self._note(f"the SVD cache {path.name} is in use by another process; not caching")
                return None
            reason = self._mismatch(path)
            if reason is None:
                try:
                    f = h5py.File(path, "r+", rdcc_nbytes=0)
                except OSError as exc:
                    self._note(f"cache {path} is in use or unwritable ({exc}); not caching")
                    return None
                reason = self._damage(f)
                if reason is None:
                    return f
                _close_quietly(f)
            self._note(f"rebuilt the SVD cache {path.name}: {reason}")
            path.unlink()
        return self._create(path)

    def _create(self, path: Path) -> h5py.File | None:
        # no raw-data chunk cache: a failed write (a full disk) fails at once, in `put`, and the
        # file can still be closed; with a chunk cache it would fail at close, leaving it open
        f = None
        try:
            f = h5py.File(path, "w", libver="latest", rdcc_nbytes=0)
            f.attrs.update(
                {"format": CACHE_FORMAT, "run_identity": self.identity, "settings": self.settings}
            )
            f.flush()
            return f
        except _WRITE_ERRORS as exc:
            _close_quietly(f)
            path.unlink(missing_ok=True)  # ours: no file was there, or the old one was removed
            self._note(f"cannot create the SVD cache {path} ({_cause(exc)}); analysing without one")
            return None

    def _refuse_foreign(self, path: Path) -> None:
        """Never delete what is not ours: the run itself, or a file at a chosen ``cache_path``
        that is not an SVD cache (a damaged cache at the default name is rebuilt)."""
        foreign = path.resolve() == self.run.path.resolve()
        if self.cfg.cache_path and not foreign:
            foreign = not h5py.is_hdf5(path) or self._mismatch(path) == _NOT_A_CACHE
        if foreign:
            raise ConfigError(
                expected(
                    "cache_path",
                    "an SVD cache or a new file",
                    str(path),
                    "That file is left untouched; pass another path.",
                )
            )

    def _mismatch(self, path: Path) -> str | None:
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != CACHE_FORMAT:
                    return _NOT_A_CACHE
                if f.attrs.get("run_identity") != self.identity:
                    return "it belongs to another run"
                settings = f.attrs.get("settings")
        except _READ_ERRORS as exc:
            return f"HDF5 cannot read it ({_cause(exc)})"
        if settings == self.settings:
            return None
        try:
            version = json.loads(settings).get("cache_version")
        except (TypeError, ValueError, AttributeError):
            version = None
        if version != CACHE_VERSION:
            return f"it is cache version {version}; this version writes {CACHE_VERSION}"
        return "it was made with other SVD settings"

    def _wanted(self) -> tuple[str, ...]:
        """The per-snapshot datasets of a layer in this mode."""
        if self.cfg.svd == "approx":
            return _APPROX
        return _EXACT + (("V64",) if self.cfg.svd_dtype == "float32" else ())

    def _damage(self, f: h5py.File) -> str | None:
        """Why an open cache cannot be trusted (None: it can): a dataset missing or without its
        checksum, or commit markers that fail it. Entry data is checked when read."""
        try:
            for name, grp in f.get("layers", {}).items():
                wanted = self._wanted() + (_PAIRS if "pair_id" in grp else ())
                for key in wanted:
                    if key not in grp or not grp[key].fletcher32:
                        return f"dataset {key} of layer {name} is missing or has no checksum"
                grp["t_id"][:]
                grp["fro2"][:]
                bad = _bad_routes(grp["route"][:], grp["t_id"][:])
                if bad:
                    return f"dataset route of layer {name} holds {bad}"
                if "pair_id" in grp:
                    grp["pair_id"][:]
        except _READ_ERRORS as exc:
            return f"it failed its checksum or could not be read ({_cause(exc)})"
        return None

    def rebuild(self, reason: str) -> None:
        """Throw the cache file away and start an empty one (after ``reason``)."""
        self._drop_file()
        self._note(f"rebuilt the SVD cache {self.path.name}: {reason}")
        self.memory.clear()
        self.pair_memory.clear()
        self.file = self._create(self.path)

    def _drop_file(self) -> None:
        self._handles.clear()
        _close_quietly(self.file)
        self.file = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the SVD cache %s: %s", self.path, exc)

    # -------------------------------------------------------------- reading and writing
    def _group(self, info: LayerInfo) -> h5py.Group:
        grp = self.file.require_group(f"layers/{encode_name(info.name)}")
        if "t_id" not in grp:
            m, n = info.shape
            kk = min(self.cfg.kmax, n)
            vec = "f4" if self.cfg.svd_dtype == "float32" else "f8"
            shapes = {"t_id": ((), "f8", 256), "fro2": ((), "f8", 256), "s": ((n,), "f8", 1)}
            shapes["route"] = ((), "i1", 256)
            if self.cfg.svd == "exact":
                shapes["V"] = ((n, n), vec, 1)
                if vec == "f4":  # float64 vectors of the few snapshots the Gram route cannot take
                    shapes["V64"] = ((n, n), "f8", 1)
            else:
                shapes |= {"U": ((m, kk), vec, 1), "V": ((n, kk), vec, 1)}
            for key, (shape, dtype, rows) in shapes.items():
                _extendable(grp, key, shape, dtype, rows)
        return grp

    def _pair_group(self, info: LayerInfo) -> h5py.Group:
        grp = self._group(info)
        if "pair_id" not in grp:
            kk = min(self.cfg.kmax, info.shape[1])
            _extendable(grp, "pair_S", (), "f8", 1024)
            _extendable(grp, "pair_L", (kk,), "f8", 64)
            _extendable(grp, "pair_R", (kk,), "f8", 64)
            _extendable(grp, "pair_id", (2,), "f8", 1024)  # the commit markers, written last
        return grp

    def missing(self, info: LayerInfo, t_ids: np.ndarray) -> list[int]:
        """Snapshots of this layer whose decomposition is not cached (or cached for another)."""
        if self.file is None:
            have = self.memory.get(info.name, {})
            return [t for t in range(len(t_ids)) if t not in have]
        grp = self.file.get(f"layers/{encode_name(info.name)}")
        try:
            cached = grp["t_id"][:] if grp is not None else np.empty(0)
        except _READ_ERRORS as exc:
            raise CacheDamagedError(self.path, _cause(exc)) from exc
        return [t for t in range(len(t_ids)) if t >= len(cached) or cached[t] != t_ids[t]]

    def put(self, info: LayerInfo, entries: list[Decomposition]) -> None:
        """Cache ``entries``; if the file cannot take them, drop it and keep them in memory."""
        if self.file is not None:
            try:
                self._write(info, sorted(entries, key=lambda e: e.t))
                return
            except _WRITE_ERRORS as exc:
                self._failed(exc)
        self.memory.setdefault(info.name, {}).update({e.t: e for e in entries})

    def _failed(self, exc: BaseException) -> None:
        path = self.path
        self._drop_file()
        self.dropped = True
        self._note(
            f"could not write the SVD cache {path} ({_cause(exc)}); removed it and went "
            "on without a cache (the next analysis rebuilds it)"
        )

    def _write(self, info: LayerInfo, entries: list[Decomposition]) -> None:
        """Data first, flushed; then the commit markers, flushed: a failure leaves no row valid."""
        ds = self._datasets(info)
        size = entries[-1].t + 1
        for key, d in ds.items():
            if d.shape[0] < size and not key.startswith("pair_"):
                d.resize(size, axis=0)
        runs = _consecutive(entries)
        for run in runs:  # one slice write per dataset and run of consecutive snapshots
            rows = slice(run[0].t, run[-1].t + 1)
            ds["s"][rows] = np.stack([e.s for e in run])
            ds["fro2"][rows] = [e.fro2 for e in run]
            ds["route"][rows] = [e.route for e in run]
            if "U" in ds:
                ds["U"][rows] = np.stack([e.U for e in run])
        for e in entries:  # V one row each, in V or V64: the other's row is never allocated
            ds[self._vector_key(e, ds)][e.t] = e.V
        self.file.flush()
        for run in runs:
            ds["t_id"][run[0].t : run[-1].t + 1] = [e.t_id for e in run]
        self.file.flush()

    def _datasets(self, info: LayerInfo) -> dict[str, h5py.Dataset]:
        """The layer's cache datasets, looked up once (h5py name lookups are not free)."""
        if info.name not in self._handles:
            grp = self._group(info)
            keys = self._wanted() + _PAIRS
            self._handles[info.name] = {k: grp[k] for k in keys if k in grp}
        return self._handles[info.name]

    def entries(self, info: LayerInfo, count: int) -> list[Decomposition | None]:
        """The cached decompositions of snapshots ``0..count-1`` of one layer (None: missing),
        without their vectors (:meth:`vectors` reads those, only where needed).

        Each dataset is read once for the whole layer: far cheaper than per-snapshot reads.

        Raises:
            CacheDamagedError: an entry failed its checksum or the file could not be read.
        """
        if self.file is None:
            have = self.memory.get(info.name, {})
            return [have.get(t) for t in range(count)]
        grp = self.file.get(f"layers/{encode_name(info.name)}")
        try:
            rows = 0 if grp is None else min(count, *(grp[k].shape[0] for k in _ROWS))
            arr = {k: grp[k][:rows] for k in _ROWS} if rows else {}
        except _READ_ERRORS as exc:
            raise CacheDamagedError(self.path, _cause(exc)) from exc
        bad = _bad_routes(arr["route"], arr["t_id"]) if rows else None
        if bad:  # Fletcher-32 cannot tell 0x0000 from 0xFFFF: a flipped route may pass it
            raise CacheDamagedError(self.path, f"layer {info.name}'s route holds {bad}")
        out: list[Decomposition | None] = [None] * count
        for t in range(rows):
            if np.isnan(arr["t_id"][t]):
                continue
            t_id, s, fro2 = float(arr["t_id"][t]), arr["s"][t], float(arr["fro2"][t])
            out[t] = Decomposition(t, t_id, s, fro2, int(arr["route"][t]))
        return out

    def vectors(self, info: LayerInfo, dec: Decomposition) -> Decomposition:
        """``dec`` with its vectors (``V``, and ``U`` in approximate mode) loaded.

        Raises:
            CacheDamagedError: they failed their checksum or could not be read.
        """
        if dec.V is not None:
            return dec
        if self.file is None:
            held = self.memory.get(info.name, {}).get(dec.t)
            if held is None:  # the file went with a failed write: decompose again
                raise CacheDamagedError(self.path, "it was removed after a failed write")
            return held
        ds = self._datasets(info)
        try:
            key = self._vector_key(dec, ds)
            v = ds[key][dec.t]
            u = ds["U"][dec.t] if "U" in ds else None
        except _READ_ERRORS as exc:
            raise CacheDamagedError(self.path, _cause(exc)) from exc
        return Decomposition(dec.t, dec.t_id, dec.s, dec.fro2, dec.route, v, u)

    def _vector_key(self, dec: Decomposition, ds: dict) -> str:
        """Where a snapshot's V lives: V64 when it is kept in float64 and V holds float32."""
        wide = vector_dtype(dec, self.cfg.dtype) == torch.float64
        return "V64" if wide and "V64" in ds else "V"

    def pairs(self, info: LayerInfo) -> dict[tuple[float, float], PairValues]:
        """The measured pairs of one layer, keyed by the two snapshots' commit times.

        Raises:
            CacheDamagedError: they failed their checksum or could not be read.
        """
        if self.file is None:
            return dict(self.pair_memory.get(info.name, {}))
        grp = self.file.get(f"layers/{encode_name(info.name)}")
        if grp is None or "pair_id" not in grp:
            return {}
        try:
            ids = grp["pair_id"][:]
            rows = len(ids)
            values = [grp[k][:rows] for k in ("pair_S", "pair_L", "pair_R")]
        except _READ_ERRORS as exc:
            raise CacheDamagedError(self.path, _cause(exc)) from exc
        return {
            (float(a), float(b)): PairValues(float(values[0][i]), values[1][i], values[2][i])
            for i, (a, b) in enumerate(ids)
            if np.isfinite(a) and np.isfinite(b)
        }

    def put_pairs(self, info: LayerInfo, new: dict[tuple[float, float], PairValues]) -> None:
        """Cache newly measured pairs (data flushed before their commit markers)."""
        if not new:
            return
        if self.file is not None:
            try:
                grp = self._pair_group(info)
                self._handles.pop(info.name, None)
                start = grp["pair_id"].shape[0]
                rows = slice(start, start + len(new))
                for key in _PAIRS:
                    grp[key].resize(start + len(new), axis=0)
                grp["pair_S"][rows] = [v.S for v in new.values()]
                grp["pair_L"][rows] = np.stack([v.left for v in new.values()])
                grp["pair_R"][rows] = np.stack([v.right for v in new.values()])
                self.file.flush()
                grp["pair_id"][rows] = np.array(list(new), dtype=np.float64)
                self.file.flush()
                return
            except _WRITE_ERRORS as exc:
                self._failed(exc)
        self.pair_memory.setdefault(info.name, {}).update(new)

    def close(self) -> None:
        """Close the file; one whose last write cannot be completed is removed (with a note)."""
        if self.file is None or not self.file.id.valid:
            return
        try:
            self.file.close()
        except _WRITE_ERRORS as exc:
            path = self.path
            self._drop_file()
            self._note(f"could not finish the SVD cache {path} ({_cause(exc)}); removed it")


def _bad_routes(route: np.ndarray, t_id: np.ndarray) -> str | None:
    """A description of committed rows whose route is not one the engine writes, or None."""
    committed = route[: len(t_id)][np.isfinite(t_id[: len(route)])]
    bad = committed[(committed < 0) | (committed > max(ROUTE_NAMES))]
    return f"the unknown route value {int(bad[0])}" if len(bad) else None


def _extendable(grp: h5py.Group, key: str, shape: tuple, dtype: str, rows: int) -> None:
    grp.create_dataset(
        key,
        (0, *shape),
        maxshape=(None, *shape),
        dtype=dtype,
        chunks=(rows, *shape),
        fletcher32=True,  # damaged data fails its checksum instead of being used
        fillvalue=-1 if dtype == "i1" else np.nan,  # unwritten rows read as unknown, not 0
    )


def _consecutive(entries: list[Decomposition]) -> list[list[Decomposition]]:
    """Split entries sorted by ``t`` into runs of consecutive snapshots."""
    runs: list[list[Decomposition]] = []
    for e in entries:
        if runs and runs[-1][-1].t + 1 == e.t:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _locked(path: Path) -> bool:
    """Whether another process holds the HDF5 file lock of ``path``."""
    try:
        h5py.File(path, "r").close()
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
