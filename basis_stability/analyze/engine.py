"""The analysis engine: one SVD per (layer, snapshot), computed once and kept in a sidecar cache.

The cache (``RUN.bstab-cache-<mode>-<dtype>.h5`` beside the run, or a path you choose) holds, per
layer and snapshot, the singular values, the polar basis ``B = U V^T`` and the top-``kmax``
singular vectors. Re-analysing a run only decomposes snapshots the cache lacks, so a run that is
still being recorded costs only its new snapshots. The recording itself is never modified.

A cache is trusted only when it names the same run (creation time, model, layers and shapes, and
the first snapshot's commit time), the same cache version and the same SVD settings; each cached
snapshot must also carry the run's own commit time for that snapshot. Anything else is rebuilt,
never reused; a file at a chosen ``cache_path`` that is not a cache (or the run itself) is never
deleted. Every cache dataset carries a Fletcher-32 checksum and an entry's data is flushed before
its commit marker, so damaged or half-written data is rebuilt, never used; a cache that cannot be
written (a full disk) is removed and the analysis goes on without one, with a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import ConfigError, RunFileError, expected
from ..store.format import encode_name
from ..store.reader import LayerInfo, LayerSnapshots, Run
from .spectra import SVD
from .stability import PROMOTE_COND, Decomposed, basis_error, basis_reason, polar_svd

log = logging.getLogger(__name__)

CACHE_FORMAT = "basis_stability.svd-cache"
# 2: a Fletcher-32 checksum on every dataset; an entry's data is flushed before its commit marker
# 3: ill-conditioned matrices are decomposed in float64 (their s and B), whatever svd_dtype says
CACHE_VERSION = 3
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NOT_A_CACHE = "not a basis_stability SVD cache"
_KEYS = ("t_id", "fro2", "s", "U", "V", "B")
_WRITE_ERRORS = (OSError, RuntimeError)  # h5py raises either for a failed write or flush
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError)  # and these for damaged files
_CHUNK = 8  # snapshots per task: bounds the memory a worker sends back at once


@dataclass
class EngineConfig:
    """How the decompositions are computed.

    Attributes:
        svd: ``exact`` (full compact SVD; every metric) or ``approx`` (randomised top-``kmax``
            SVD: overlaps, top singular values and stable rank only; S needs every singular
            vector and is NaN in this mode).
        svd_dtype: ``float32`` or ``float64``; never half precision, whatever was stored.
        kmax: singular vectors kept per snapshot (bounds the k of the top-k overlap).
        oversample: extra random directions of the approximate mode.
        power_iters: power iterations of the approximate mode.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        jobs: worker processes (layers are spread over them); 1 computes in this process.
        cache: keep decompositions in a sidecar file; ``cache_path`` overrides where.
    """

    svd: str = "exact"
    svd_dtype: str = "float32"
    kmax: int = 32
    oversample: int = 10
    power_iters: int = 6
    device: str = "cpu"
    jobs: int = 1
    cache: bool = True
    cache_path: str | None = None

    def __post_init__(self) -> None:
        if self.svd not in ("exact", "approx"):
            raise ConfigError(expected("svd", "exact or approx", self.svd, "exact is default."))
        if self.svd_dtype not in _DTYPES:
            raise ConfigError(
                expected("svd_dtype", "float32 or float64", self.svd_dtype, "Use float32.")
            )
        for name, low in (("kmax", 1), ("jobs", 1), ("oversample", 0), ("power_iters", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                wanted = "a positive integer" if low else "a non-negative integer"
                raise ConfigError(expected(name, wanted, value, f"Use e.g. {low + 1}."))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(expected("device", "cpu, cuda or cuda:N", self.device, "Use cpu."))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                expected("device", "an available device", self.device, "Use --device cpu.")
            )

    def settings(self) -> dict:
        """What makes two caches interchangeable (device and jobs do not)."""
        keep = ("svd", "svd_dtype", "kmax") + (
            ("oversample", "power_iters") * (self.svd == "approx")
        )
        return {"cache_version": CACHE_VERSION, **{k: asdict(self)[k] for k in keep}}


# ---------------------------------------------------------------------- decomposition
@dataclass
class Entry:
    """The cached decomposition of one snapshot of one layer."""

    t: int
    t_id: float  # the run's unix_time of snapshot t: the entry's identity
    s: np.ndarray  # (n,) singular values, NaN where unknown
    fro2: float  # squared Frobenius norm
    B: np.ndarray | None  # (m, n) polar basis, exact mode only
    U: np.ndarray  # (m, kk)
    V: np.ndarray  # (n, kk)


def storage_dtype(info: LayerInfo) -> torch.dtype:
    """The torch dtype a layer's weights were stored in (it sets the rank decision's tolerance)."""
    return _STORAGE.get(info.storage_dtype, torch.float32)


def _decompose(w: torch.Tensor, cfg: EngineConfig, storage: torch.dtype = torch.float32) -> tuple:
    """(s, fro2, B, U, V) of one tall matrix; NaN-filled when it holds NaN/Inf.

    In exact mode an ill-conditioned matrix is decomposed in float64
    (:func:`~.stability.polar_svd`); its basis is still cached in ``svd_dtype``, which costs S
    only about that dtype's epsilon.
    """
    m, n = w.shape
    kk = min(cfg.kmax, n)
    dtype = _DTYPES[cfg.svd_dtype]
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    w = w.to(cfg.device, dtype)  # cast first: finite float64 weights can overflow float32
    if not torch.isfinite(w).all():
        nan = np.full
        b = nan((m, n), np.nan, np_dtype) if cfg.svd == "exact" else None
        return (
            nan(n, np.nan),
            math.nan,
            b,
            nan((m, kk), np.nan, np_dtype),
            nan((n, kk), np.nan, np_dtype),
        )
    if cfg.svd == "exact":
        (u, s, vh), _ = polar_svd(w, dtype, storage)
        b = (u @ vh).to(dtype).cpu().numpy()
        u, vh = u.to(dtype), vh.to(dtype)  # every entry of a layer in one dtype (they are stacked)
        s_full = s.double().cpu().numpy()
        fro2 = float((s_full**2).sum())  # = ||W||_F^2, without another pass over W
    else:
        fro2 = float(torch.linalg.matrix_norm(w.double()) ** 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # deterministic sketches: re-analysis gives the same numbers
            u, s, v = torch.svd_lowrank(w, q=min(kk + cfg.oversample, n), niter=cfg.power_iters)
        vh, b = v.T, None
        s_full = np.full(n, np.nan)
        s_full[:kk] = s[:kk].double().cpu().numpy()
    # copies, not views: a view would keep the whole (m, n) U and (n, n) Vh alive in memory
    # mode, and contiguous arrays give the same bits whether or not they passed the cache file
    u_k = np.ascontiguousarray(u[:, :kk].cpu().numpy())
    return (s_full, fro2, b, u_k, np.ascontiguousarray(vh[:kk].T.cpu().numpy()))


def decompose_snapshots(
    snaps: LayerSnapshots, indices: list[int], t_ids: list[float], cfg: EngineConfig
) -> list[Entry]:
    """Decompose snapshots ``indices`` of one layer."""
    out = []
    storage = storage_dtype(snaps.info)
    for t, t_id in zip(indices, t_ids):
        s, fro2, b, u, v = _decompose(torch.from_numpy(snaps[t]), cfg, storage)
        out.append(Entry(t, t_id, s, fro2, b, u, v))
    return out


def decompose_task(
    path: str, name: str, indices: list[int], t_ids: list[float], cfg: EngineConfig
) -> tuple[str, list[Entry]]:
    """:func:`decompose_snapshots` in a worker process, which opens the run itself."""
    from ..store.reader import open_run

    with open_run(path) as run:
        return name, decompose_snapshots(run.layer(name), indices, t_ids, cfg)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- the cache
def run_identity(run: Run) -> str:
    """A fingerprint of the run a cache belongs to.

    ``created`` has one-second resolution, so two runs of one model started in the same second
    would share it; the first snapshot's commit time (microseconds, kept by resume and recovery)
    tells them apart.
    """
    a = run.attrs
    layers = [(i.name, i.shape, i.storage_dtype) for i in run.layers]
    first = run._index()["unix_time"][:1].tolist()
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
            "Delete it (it is rebuilt) or pass --no-cache."
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
        self.memory: dict[str, dict[int, Entry]] = {}
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

    def _damage(self, f: h5py.File) -> str | None:
        """Why an open cache cannot be trusted (None: it can): a dataset missing or without its
        checksum, or commit markers that fail it. Entry data is checked when read."""
        wanted = _KEYS if self.cfg.svd == "exact" else _KEYS[:-1]
        try:
            for name, grp in f.get("layers", {}).items():
                for key in wanted:
                    if key not in grp or not grp[key].fletcher32:
                        return f"dataset {key} of layer {name} is missing or has no checksum"
                grp["t_id"][:]
                grp["fro2"][:]
        except _READ_ERRORS as exc:
            return f"it failed its checksum or could not be read ({_cause(exc)})"
        return None

    def rebuild(self, reason: str) -> None:
        """Throw the cache file away and start an empty one (after ``reason``)."""
        self._drop_file()
        self._note(f"rebuilt the SVD cache {self.path.name}: {reason}")
        self.memory.clear()
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
            shapes |= {"U": ((m, kk), vec, 1), "V": ((n, kk), vec, 1)}
            if self.cfg.svd == "exact":
                shapes["B"] = ((m, n), vec, 1)
            for key, (shape, dtype, rows) in shapes.items():
                grp.create_dataset(
                    key,
                    (0, *shape),
                    maxshape=(None, *shape),
                    dtype=dtype,
                    chunks=(rows, *shape),
                    fletcher32=True,  # damaged data fails its checksum instead of being used
                    fillvalue=np.nan,  # rows not (or not yet) written read as unknown, not 0
                )
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

    def put(self, info: LayerInfo, entries: list[Entry]) -> None:
        """Cache ``entries``; if the file cannot take them, drop it and keep them in memory."""
        if self.file is not None:
            try:
                self._write(info, sorted(entries, key=lambda e: e.t))
                return
            except _WRITE_ERRORS as exc:
                path = self.path
                self._drop_file()
                self.dropped = True
                self._note(
                    f"could not write the SVD cache {path} ({_cause(exc)}); removed it and went "
                    "on without a cache (the next analysis rebuilds it)"
                )
        self.memory.setdefault(info.name, {}).update({e.t: e for e in entries})

    def _write(self, info: LayerInfo, entries: list[Entry]) -> None:
        """Data first, flushed; then the commit markers, flushed: a failure leaves no row valid."""
        ds = self._datasets(info)
        size = entries[-1].t + 1
        for d in ds.values():
            if d.shape[0] < size:
                d.resize(size, axis=0)
        runs = _consecutive(entries)
        for run in runs:  # one slice write per dataset and run of consecutive snapshots
            rows = slice(run[0].t, run[-1].t + 1)
            ds["s"][rows] = np.stack([e.s for e in run])
            ds["fro2"][rows] = [e.fro2 for e in run]
            ds["U"][rows] = np.stack([e.U for e in run])
            ds["V"][rows] = np.stack([e.V for e in run])
            if "B" in ds:
                ds["B"][rows] = np.stack([e.B for e in run])
        self.file.flush()
        for run in runs:
            ds["t_id"][run[0].t : run[-1].t + 1] = [e.t_id for e in run]
        self.file.flush()

    def _datasets(self, info: LayerInfo) -> dict[str, h5py.Dataset]:
        """The layer's cache datasets, looked up once (h5py name lookups are not free)."""
        if info.name not in self._handles:
            grp = self._group(info)
            self._handles[info.name] = {k: grp[k] for k in _KEYS if k in grp}
        return self._handles[info.name]

    def entries(self, info: LayerInfo, count: int) -> list[Entry | None]:
        """The cached decompositions of snapshots ``0..count-1`` of one layer (None: missing).

        Each dataset is read once for the whole layer: far cheaper than per-snapshot reads.

        Raises:
            CacheDamagedError: an entry failed its checksum or the file could not be read.
        """
        if self.file is None:
            have = self.memory.get(info.name, {})
            return [have.get(t) for t in range(count)]
        grp = self.file.get(f"layers/{encode_name(info.name)}")
        try:
            rows = 0 if grp is None else min(count, *(grp[k].shape[0] for k in grp))
            arr = {k: grp[k][:rows] for k in _KEYS if k in grp} if rows else {}
        except _READ_ERRORS as exc:
            raise CacheDamagedError(self.path, _cause(exc)) from exc
        out: list[Entry | None] = [None] * count
        for t in range(rows):
            if np.isnan(arr["t_id"][t]):
                continue
            b = arr["B"][t] if "B" in arr else None
            s, fro2 = arr["s"][t], float(arr["fro2"][t])
            out[t] = Entry(t, float(arr["t_id"][t]), s, fro2, b, arr["U"][t], arr["V"][t])
        return out

    def decomposed(self, info: LayerInfo, entry: Entry) -> Decomposed:
        """One cached entry as the metrics take it (basis None, with a reason, if undefined)."""
        s = torch.from_numpy(np.asarray(entry.s))
        svd = SVD(torch.from_numpy(entry.U), s, torch.from_numpy(entry.V).T)
        storage, error = storage_dtype(info), math.nan
        if self.cfg.svd == "exact":
            reason = basis_reason(s, info.shape, storage)
            # the cond rule of polar_svd says which dtype computed it
            cond = float(s[0] / s[-1]) if len(s) and float(s[-1]) > 0 else math.inf
            computed = torch.float64 if cond > PROMOTE_COND else _DTYPES[self.cfg.svd_dtype]
            error = basis_error(s, storage, computed)
        else:
            reason = "approximate SVD mode: S needs every singular vector"
        basis = None if reason or entry.B is None else torch.from_numpy(entry.B)
        return Decomposed(svd, basis, reason, error)

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


def _consecutive(entries: list[Entry]) -> list[list[Entry]]:
    """Split entries sorted by ``t`` into runs of consecutive snapshots."""
    runs: list[list[Entry]] = []
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


# ---------------------------------------------------------------------- driving it
def _tasks(run: Run, cache: SVDCache, available: dict[str, int]) -> list[tuple]:
    t_ids = run._index()["unix_time"]
    tasks = []
    for info in run.layers:
        todo = cache.missing(info, t_ids[: available[info.name]])
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i : i + _CHUNK]
            tasks.append((str(run.path), info.name, chunk, [float(t_ids[t]) for t in chunk]))
    return tasks


def fill_cache(
    run: Run, cache: SVDCache, cfg: EngineConfig, available: dict[str, int], progress: bool = False
) -> int:
    """Decompose every snapshot the cache lacks; returns how many were computed."""
    from tqdm.auto import tqdm

    tasks = _tasks(run, cache, available)
    total = sum(len(t[2]) for t in tasks)
    if not total:
        return 0
    infos = {i.name: i for i in run.layers}
    bar = tqdm(total=total, desc="SVD", unit="matrix", disable=not progress)
    if cfg.jobs == 1 or len(tasks) == 1:
        for _, name, indices, t_ids in tasks:  # in this process, on the run already open
            entries = decompose_snapshots(run.layer(name), indices, t_ids, cfg)
            cache.put(infos[name], entries)
            bar.update(len(entries))
    else:
        import multiprocessing as mp

        threads = max(1, len(os.sched_getaffinity(0)) // cfg.jobs)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "h5py", "basis_stability.analyze.engine"])
        # largest layers first: they bound the wall time
        tasks.sort(key=lambda t: -math.prod(infos[t[1]].shape) * len(t[2]))
        with ProcessPoolExecutor(
            cfg.jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(decompose_task, *task, cfg) for task in tasks]
            for fut in as_completed(futures):
                name, entries = fut.result()
                cache.put(infos[name], entries)
                bar.update(len(entries))
    bar.close()
    return total
