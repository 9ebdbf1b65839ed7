"""The engine's decomposition maths: singular values, right singular vectors and the polar basis
of each snapshot of a tall ``(m, n)`` matrix, without a full SVD where that is exact enough.

**The Gram route** (exact mode's default). ``G = W^T W`` is formed in float64 (each product of
two float32 values is exact in float64) and ``torch.linalg.eigh(G) = V diag(lambda) V^T`` gives
``sigma_i = sqrt(lambda_i)`` and the right singular vectors ``V``. Everything else follows from
``V``, ``sigma`` and the run's own weights (:func:`bases`):

* the polar basis ``B = U V^T = W V diag(1/sigma) V^T = W G^(-1/2)`` (what S needs);
* the top-k left singular vectors ``U_k = W V_k diag(1/sigma_k)`` (what the overlap needs).

Snapshots of one layer are stacked and decomposed in one batched call (a chunk bounded by
:attr:`~.config.EngineConfig.chunk_mb`). The eigendecomposition is backward stable for ``G``:
each eigenvalue is off by about ``n eps64 lambda_1``, so ``sigma_i`` by about
``n eps64 sigma_1^2 / sigma_i`` and the basis by about ``eps64 cond^2``. Measured against a
float64 SVD on designed spectra (``tests/test_gram_route.py``), S, sigma (relative to sigma_1)
and O_k stay within 1e-7 up to ``cond = 1e4`` and S drifts to 6e-6 at ``1e5``: above
:data:`GRAM_COND` = 1e4 a snapshot is decomposed by a float64 SVD instead (the ``svd64`` route),
as is one whose smallest singular value is near the rank tolerance (the rank decision is then
made on SVD singular values, as before).

**What is cached** (:mod:`.cache`): sigma in float64, ``V`` rounded to the cache dtype (float32
by default) and the route. ``B`` and ``U_k`` are always rebuilt from the run's weights and that
rounded ``V`` (:func:`bases`), in a fresh analysis as in a cached one, so the numbers do not
depend on what the cache held. Rounding ``V`` to float32 moves S by at most 1.3e-7 up to
``cond = 1e3`` but by up to 3e-6 at ``1e4`` (measured, :func:`vector_dtype`): above
:data:`~.stability.PROMOTE_COND` = 1e3, and for every ``svd64`` snapshot, ``V`` is kept in
float64.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..store.reader import LayerInfo, LayerSnapshots
from .config import EngineConfig
from .stability import PROMOTE_COND, basis_error, basis_reason, polar_svd, rank_tolerance

# above this condition number the Gram route's basis loses more than 1e-6 of S (measured): the
# snapshot is decomposed by a float64 SVD instead
GRAM_COND = 1e4

# how a snapshot was decomposed (stored per snapshot in the cache)
GRAM, SVD32, SVD64, NONFINITE, APPROX = 0, 1, 2, 3, 4
ROUTE_NAMES = {GRAM: "gram", SVD32: "svd32", SVD64: "svd64", NONFINITE: "nonfinite"}
ROUTE_NAMES[APPROX] = "approx"

_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BYTES_PER_ENTRY = 8 * 3  # float64 copy of W, its product and slack, per entry of a chunk


def storage_dtype(info: LayerInfo) -> torch.dtype:
    """The torch dtype a layer's weights were stored in (it sets the rank decision's tolerance)."""
    return _STORAGE.get(info.storage_dtype, torch.float32)


@dataclass
class Decomposition:
    """The decomposition of one snapshot of one layer (what the cache stores).

    Attributes:
        t: the snapshot's index.
        t_id: the run's commit time of snapshot ``t`` (the entry's identity in the cache).
        s: ``(n,)`` singular values in float64, descending; NaN where unknown.
        fro2: ``||W||_F^2``; NaN for NaN/Inf weights.
        route: :data:`GRAM`, :data:`SVD32`, :data:`SVD64`, :data:`NONFINITE` or :data:`APPROX`.
        V: right singular vectors: ``(n, n)`` in exact mode (float64 for ``svd64``, else the
            cache dtype), ``(n, kk)`` in approximate mode; None when not loaded.
        U: ``(m, kk)`` top left singular vectors, approximate mode only (exact mode rebuilds
            them from the weights).
    """

    t: int
    t_id: float
    s: np.ndarray
    fro2: float
    route: int
    V: np.ndarray | None = None
    U: np.ndarray | None = None

    @property
    def computed(self) -> torch.dtype:
        """The precision the basis was computed in (it sets :func:`basis_error`)."""
        return torch.float32 if self.route == SVD32 else torch.float64


def chunk_size(shape: tuple[int, int], cfg: EngineConfig) -> int:
    """Snapshots of one layer decomposed in one batched call, within ``cfg.chunk_mb``."""
    m, n = shape
    per = (m * n + 2 * n * n) * _BYTES_PER_ENTRY
    return max(1, min(64, int(cfg.chunk_mb * 2**20 // per)))


def _nonfinite(t: int, t_id: float, shape: tuple[int, int], cfg: EngineConfig) -> Decomposition:
    m, n = shape
    kk = min(cfg.kmax, n)
    v = np.full((n, n if cfg.svd == "exact" else kk), np.nan, np.dtype(_np(cfg.dtype)))
    u = None if cfg.svd == "exact" else np.full((m, kk), np.nan, v.dtype)
    return Decomposition(t, t_id, np.full(n, np.nan), math.nan, NONFINITE, v, u)


def _np(dtype: torch.dtype) -> type:
    return np.float32 if dtype == torch.float32 else np.float64


def _needs_svd(s: torch.Tensor, shape: tuple[int, int], storage: torch.dtype) -> bool:
    """Whether the Gram route's singular values ``s`` are not accurate enough to use."""
    top, low = float(s[0]), float(s[-1])
    if not (top > 0 and low > 0 and math.isfinite(top)):
        return True
    return top / low > GRAM_COND or low <= 4 * rank_tolerance(s, shape, storage)


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a stack of Gram matrices: one batched call on a GPU; on the CPU
    one matrix per thread (:func:`one_thread_each`)."""
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram)
    pairs = one_thread_each(torch.linalg.eigh, list(gram))
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


_THREADS = threading.Lock()


def one_thread_each(fn, items: list) -> list:
    """``[fn(x) for x in items]`` with one LAPACK thread per call, as many calls at once as torch
    has threads.

    LAPACK's ``eigh`` with several OpenMP threads slows down 25x when another process shares
    the cores (measured on 2 cores: 72 ms single-threaded, 1.8 s with two threads); one thread
    per matrix keeps the cores busy without that. It also makes the bits independent of how
    the work is split: every matrix is decomposed single-threaded, here, in ``jobs`` workers
    and on torchrun ranks alike.
    """
    threads = torch.get_num_threads()
    with _THREADS:
        if threads == 1 or not items:
            return [fn(x) for x in items]
        torch.set_num_threads(1)
        try:
            if len(items) == 1:
                return [fn(items[0])]
            with ThreadPoolExecutor(min(threads, len(items))) as pool:
                return list(pool.map(fn, items))
        finally:
            torch.set_num_threads(threads)


def decompose_batch(
    ws: torch.Tensor,
    ts: list[int],
    t_ids: list[float],
    cfg: EngineConfig,
    storage: torch.dtype = torch.float32,
) -> list[Decomposition]:
    """Decompose a stack ``(c, m, n)`` of snapshots of one layer (see the module docstring)."""
    if cfg.svd == "approx":
        return [_approx(w, t, i, cfg) for w, t, i in zip(ws, ts, t_ids)]
    shape = tuple(ws.shape[1:])
    w = ws.to(cfg.device, torch.float64)
    finite = torch.isfinite(w).flatten(1).all(1).tolist()
    out: list[Decomposition | None] = [None] * len(ts)
    if cfg.method == "gram" and any(finite):
        ok = [i for i, f in enumerate(finite) if f]
        sub = w[ok]
        gram = sub.mT @ sub
        lam, vec = _eigh(gram)
        # descending order; a negative eigenvalue is round-off of a (near) zero one
        s_all = lam.flip(-1).clamp_min(0).sqrt().cpu()
        v_all = vec.flip(-1).cpu().numpy()
        fro2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1).cpu().tolist()
        for j, i in enumerate(ok):
            if not _needs_svd(s_all[j], shape, storage):
                s = s_all[j].numpy().copy()
                dec = Decomposition(ts[i], t_ids[i], s, fro2[j], GRAM)
                # a copy in its own buffer (as vectors read back from the cache are), rounded
                dec.V = v_all[j].astype(_np(vector_dtype(dec, cfg.dtype)), order="C")
                out[i] = dec
    todo = []
    for i, f in enumerate(finite):
        if out[i] is None and not f:
            out[i] = _nonfinite(ts[i], t_ids[i], shape, cfg)
        elif out[i] is None:
            todo.append(i)
    svd = partial(_by_svd, cfg=cfg, storage=storage)
    args = [(ws[i], ts[i], t_ids[i]) for i in todo]
    if cfg.device == "cpu":
        done = one_thread_each(lambda a: svd(*a), args)
    else:
        done = [svd(*a) for a in args]
    for i, dec in zip(todo, done):
        out[i] = dec
    return out


def _by_svd(
    w: torch.Tensor, t: int, t_id: float, cfg: EngineConfig, storage: torch.dtype
) -> Decomposition:
    """The SVD route: float64 for a snapshot the Gram route cannot resolve; with
    ``method="svd"``, ``svd_dtype`` redone in float64 where that would lose the basis."""
    dtype = torch.float64 if cfg.method == "gram" else cfg.dtype
    (_, s, vh), computed = polar_svd(w.to(cfg.device, dtype), dtype, storage)
    s64 = s.double().cpu().numpy()
    route = SVD64 if computed == torch.float64 else SVD32
    dec = Decomposition(t, t_id, s64, float((s64**2).sum()), route)
    dec.V = np.ascontiguousarray(vh.mT.to(vector_dtype(dec, cfg.dtype)).cpu().numpy())
    return dec


def vector_dtype(dec: Decomposition, cached: torch.dtype) -> torch.dtype:
    """The precision ``V`` is kept in: ``cached`` (the engine's ``svd_dtype``), or float64 for a
    snapshot decomposed by a float64 SVD or with a condition number above
    :data:`~.stability.PROMOTE_COND`, where float32 vectors would cost S more than 1e-7
    (rounding ``V`` moves ``B`` by up to ``cond`` times its rounding, in the directions that
    mix large and small singular values; measured: below 1.3e-7 up to cond 1e3, 3e-6 at 1e4)."""
    if dec.route == SVD64:
        return torch.float64
    s = dec.s
    cond = float(s[0] / s[-1]) if len(s) and s[-1] > 0 else math.inf
    return torch.float64 if not cond <= PROMOTE_COND else cached


def _approx(w: torch.Tensor, t: int, t_id: float, cfg: EngineConfig) -> Decomposition:
    """Randomised top-``kmax`` SVD (approximate mode): no basis, only the top of the spectrum."""
    m, n = w.shape
    kk = min(cfg.kmax, n)
    w = w.to(cfg.device, cfg.dtype)  # cast first: finite float64 weights can overflow float32
    if not torch.isfinite(w).all():
        return _nonfinite(t, t_id, (m, n), cfg)
    fro2 = float(torch.linalg.matrix_norm(w.double()) ** 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # deterministic sketches: re-analysis gives the same numbers
        u, s, v = torch.svd_lowrank(w, q=min(kk + cfg.oversample, n), niter=cfg.power_iters)
    s_full = np.full(n, np.nan)
    s_full[:kk] = s[:kk].double().cpu().numpy()
    u_k = np.ascontiguousarray(u[:, :kk].cpu().numpy())
    v_k = np.ascontiguousarray(v[:, :kk].cpu().numpy())
    return Decomposition(t, t_id, s_full, fro2, APPROX, v_k, u_k)


def decompose_snapshots(
    snaps: LayerSnapshots, indices: list[int], t_ids: list[float], cfg: EngineConfig
) -> list[Decomposition]:
    """Decompose snapshots ``indices`` of one layer, a memory-bounded chunk at a time."""
    storage = storage_dtype(snaps.info)
    size = chunk_size(snaps.info.shape, cfg)
    out: list[Decomposition] = []
    for i in range(0, len(indices), size):
        ts, ids = indices[i : i + size], t_ids[i : i + size]
        ws = torch.from_numpy(np.stack([snaps[t] for t in ts]))
        out += decompose_batch(ws, ts, ids, cfg, storage)
    return out


# ---------------------------------------------------------------------- bases and pairs
@dataclass
class Bases:
    """What the pair metrics need from one snapshot, on the engine's device, in float64.

    Attributes:
        B: ``(m, n)`` polar basis, or None when it is not unique (``reason`` says why).
        U: ``(m, kk)`` top left singular vectors (NaN columns where ``s_i = 0``).
        V: ``(n, kk)`` top right singular vectors.
    """

    B: torch.Tensor | None
    U: torch.Tensor
    V: torch.Tensor


def bases(w: np.ndarray | None, dec: Decomposition, kk: int, device: str, basis: bool) -> Bases:
    """Rebuild the basis and top vectors of one snapshot from its weights and cached ``V``.

    ``B = W (V diag(1/s) V^T)`` and ``U_k = W V_k diag(1/s_k)``, in float64 on ``device``; the
    same operations whether ``V`` was just computed or read back from the cache (it is rounded
    to the cache dtype in both), so a cached analysis gives the bits of a fresh one. ``w`` may
    be None in approximate mode (``U`` is cached there) or when ``basis`` is False and the
    vectors are not needed.
    """
    v = _fresh(dec.V, device)
    s = _fresh(dec.s[: v.shape[1]], device)
    if dec.route == APPROX:
        return Bases(None, _fresh(dec.U, device)[:, :kk], v[:, :kk])
    w64 = _fresh(w, device)
    with np.errstate(divide="ignore"):
        inv = torch.where(s > 0, 1.0 / s, torch.full_like(s, math.nan))
    u_k = (w64 @ v[:, :kk]) * inv[:kk]
    b = w64 @ ((v * inv) @ v.mT) if basis else None
    return Bases(b, u_k, v[:, :kk])


def _fresh(a: np.ndarray, device: str) -> torch.Tensor:
    """A C-ordered float64 copy in a buffer of its own: BLAS results depend on the memory
    layout (eigh returns column-major vectors), and the bits must not depend on whether an
    input came from the cache."""
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)


@dataclass(frozen=True)
class PairValues:
    """S and the cumulative overlaps of one pair of snapshots.

    ``left[k-1] / k`` is ``O_k`` of the left (U) subspaces, ``right[k-1] / k`` of the right
    ones, for every ``k <= kk``: one pair serves any k.
    """

    S: float
    left: np.ndarray
    right: np.ndarray


def cumulative_overlap(q_a: torch.Tensor, q_b: torch.Tensor) -> np.ndarray:
    """``c_k = ||Q_a[:, :k]^T Q_b[:, :k]||_F^2`` for ``k = 1..kk`` (so ``O_k = c_k / k``)."""
    m2 = (q_a.mT @ q_b).pow(2)
    return m2.cumsum(0).cumsum(1).diagonal().cpu().numpy()


def pair_values(a: Bases, b: Bases, n: int) -> PairValues:
    """S (NaN without both bases) and the cumulative overlaps of two snapshots."""
    s = math.nan if a.B is None or b.B is None else float(torch.dot(a.B.ravel(), b.B.ravel())) / n
    return PairValues(s, cumulative_overlap(a.U, b.U), cumulative_overlap(a.V, b.V))


def reason_of(dec: Decomposition, shape: tuple[int, int], storage: torch.dtype) -> str | None:
    """Why this snapshot's basis is not unique, or None (the rules of :mod:`.stability`)."""
    if dec.route == NONFINITE:
        return "NaN/Inf in the weights"
    if dec.route == APPROX:
        return "approximate SVD mode: S needs every singular vector"
    return basis_reason(torch.from_numpy(np.asarray(dec.s)), shape, storage)


def error_of(dec: Decomposition, storage: torch.dtype, vectors: torch.dtype) -> float:
    """First-order bound on ``||dB||_F`` of the rebuilt basis; NaN when undefined.

    :func:`~.stability.basis_error` with the backward error of the stored rounding plus the
    rounding of the cached ``V`` (``vectors``, at most that dtype's epsilon times ``||W||_F``
    as a perturbation of ``W``); the Gram route adds its own forward error,
    ``sqrt(n) n eps64 cond^2`` (each eigenvalue of ``G`` off by ``n eps64 lambda_1``).
    """
    if dec.route in (NONFINITE, APPROX):
        return math.nan
    s = torch.from_numpy(np.asarray(dec.s))
    rounding = vector_dtype(dec, vectors)
    computed = torch.float32 if torch.float32 in (dec.computed, rounding) else torch.float64
    error = basis_error(s, storage, computed)
    if dec.route == GRAM and math.isfinite(error):
        n = len(dec.s)
        cond = float(dec.s[0] / dec.s[-1])
        error += math.sqrt(n) * n * torch.finfo(torch.float64).eps * cond**2
    return error
