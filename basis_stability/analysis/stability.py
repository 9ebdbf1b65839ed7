"""Basis stability and top-k subspace overlap between two snapshots (SPEC §2, §3). Pure maths.

**Stability** ``S(a, b) = trace(B_a^T B_b) / n`` with ``B = U V^T`` the polar factor of the tall
``(m, n)`` matrix. ``B`` is unique exactly when the matrix has full column rank ``n``; then ``S``
is invariant to every SVD ambiguity (sign flips of singular pairs, rotations inside repeated
singular values). For a rank-deficient or zero matrix the columns of ``U`` and ``V`` belonging to
zero singular values are arbitrary, so ``B`` and ``S`` are not defined: the functions here return
NaN with the reason instead of a number that depends on the LAPACK routine.

**The rank decision** is made at the precision the weights were *stored* in, with singular values
in float64: the matrix counts as rank-deficient only when ``s_n <= rank_tolerance(s, shape,
storage) = max(u_storage ||W||_F, max(m, n) eps64 s_1)``. Rounding each stored value moves ``W`` by
at most ``u_storage ||W||_F`` (``u`` = half the machine epsilon), and no singular value moves more
than that (Weyl), so above it the data cannot come from a rank-deficient matrix; the second term is
the float64 SVD's own round-off. An ill-conditioned matrix (``s_1 / s_n > PROMOTE_COND``) is
decomposed in float64 whatever the engine's dtype (:func:`polar_svd`), because a float32 polar
factor loses about ``eps32 * s_1 / s_n`` in its smallest directions. :func:`basis_error` bounds
what is left: ``||dB||_F <= 2 ||dW||_F / s_n`` to first order.

**Overlap** ``O_k(a, b) = ||U_a[:, :k]^T U_b[:, :k]||_F^2 / k`` (and the same for ``V``) is the
mean squared cosine of the principal angles between the two top-k subspaces, in [0, 1]. The
top-k subspace is unique when ``s_k > s_{k+1}``; without that gap ``O_k`` is NaN with a reason.

Example:
    >>> import torch
    >>> w = torch.randn(20, 8, dtype=torch.float64)
    >>> a = decompose(w, torch.float64)
    >>> round(stability(a, a).value, 12), round(overlap(a, a, k=3).left, 12)
    (1.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .spectra import SVD, compact_svd

# above this condition number a float32 polar factor is recomputed in float64: measured on designed
# spectra, float32 S stays within 1e-7 of float64 up to 1e3 and drifts to 1e-6 at 1e4, 3e-5 at 1e6
PROMOTE_COND = 1e3

__all__ = [
    "Decomposed",
    "Measure",
    "Overlap",
    "PROMOTE_COND",
    "basis_error",
    "basis_reason",
    "condition_number",
    "decompose",
    "matched_cosines",
    "mean_stability",
    "overlap",
    "pairwise_overlap",
    "pairwise_stability",
    "polar_svd",
    "principal_angles",
    "rank_tolerance",
    "stability",
    "stability_bound",
    "stability_error",
    "subspace_overlap",
    "topk_reason",
]


@dataclass(frozen=True)
class Measure:
    """A number, or NaN with the reason it is undefined."""

    value: float
    reason: str | None = None


@dataclass(frozen=True)
class Overlap:
    left: float
    right: float
    k: int
    reason: str | None = None


@dataclass(frozen=True)
class Decomposed:
    """What the metrics need from one snapshot: its SVD, the basis, and whether they are defined.

    Attributes:
        svd: the compact SVD.
        basis: ``B = U V^T`` (m, n), or None when it is not unique.
        reason: why ``basis`` is None (rank-deficient, zero, non-finite).
        error: first-order bound on ``||dB||_F`` (:func:`basis_error`); NaN when not known.
    """

    svd: SVD
    basis: torch.Tensor | None
    reason: str | None
    error: float = math.nan


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a float dtype: the largest relative rounding error of a value."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def _frobenius(s: torch.Tensor) -> float:
    """``||W||_F`` from its singular values, scaled so that huge values do not overflow."""
    top = float(s[0]) if len(s) else 0.0
    return top * float((s / top).pow(2).sum().sqrt()) if top > 0 else 0.0


def rank_tolerance(s: torch.Tensor, shape: tuple[int, int], storage: torch.dtype) -> float:
    """Singular values at or below this are indistinguishable from 0 in the stored data.

    ``max(u_storage ||W||_F, max(m, n) eps64 s_1)``: rounding the stored values perturbs ``W`` by
    at most ``u_storage ||W||_F`` in the Frobenius (hence spectral) norm, which bounds how far any
    singular value can move (Weyl); the second term is the round-off of a float64 SVD (NumPy's
    ``matrix_rank`` rule in float64).

    Args:
        s: ``(n,)`` singular values, descending, ideally from a float64 SVD.
        shape: ``(m, n)`` of the matrix.
        storage: the dtype the weights were stored in (float16, bfloat16, float32, float64).
    """
    s = torch.as_tensor(s).double()
    top = float(s[0]) if len(s) else 0.0
    fro = _frobenius(s)
    return max(_unit_roundoff(storage) * fro, max(shape) * torch.finfo(torch.float64).eps * top)


def condition_number(s: torch.Tensor) -> float:
    """``s_1 / s_n`` in float64; inf for a singular matrix, NaN when unknown or zero."""
    s = torch.as_tensor(s).double()
    if not len(s) or not torch.isfinite(s).all() or float(s[0]) <= 0:
        return math.nan
    return float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf


def basis_reason(s: torch.Tensor, shape: tuple[int, int], storage: torch.dtype) -> str | None:
    """Why the polar basis of a matrix with singular values ``s`` is not unique, or None.

    ``storage`` is the dtype the weights were stored in; the decision is
    ``s_n <= rank_tolerance(s, shape, storage)`` (see the module docstring for why).
    """
    if not torch.isfinite(torch.as_tensor(s)).all():
        return "NaN/Inf in the weights or their SVD"
    if not len(s) or float(s[0]) <= 0:
        return "zero matrix: no basis"
    tol = rank_tolerance(s, shape, storage)
    rank = int((torch.as_tensor(s).double() > tol).sum())
    if rank < len(s):
        name = str(storage).removeprefix("torch.")
        return (
            f"rank-deficient (numerical rank {rank} < {len(s)} at the stored {name} precision, "
            f"s_min {float(s[-1]):.3g} <= {tol:.3g}): basis not unique"
        )
    return None


def polar_svd(
    w: torch.Tensor, dtype: torch.dtype = torch.float32, storage: torch.dtype = torch.float32
) -> tuple[SVD, torch.dtype]:
    """The compact SVD of ``w`` in ``dtype``, redone in float64 where float32 would lose ``B``.

    Redone when the float32 condition number exceeds :data:`PROMOTE_COND` (the basis would lose
    accuracy) or ``s_n`` is within 4x of :func:`rank_tolerance` (the rank decision is close), so
    both the basis and the rank decision of such a matrix come from float64 singular values.
    Elsewhere the float32 ``s_n`` is far above both, and its round-off (about ``eps32 s_1``)
    cannot change the decision.

    Returns:
        The SVD and the dtype it was computed in.
    """
    svd = compact_svd(w, dtype)
    s = svd.S
    if dtype == torch.float64 or not len(s) or not torch.isfinite(s).all() or float(s[0]) <= 0:
        return svd, dtype
    close = float(s[-1]) <= 4 * rank_tolerance(s, tuple(w.shape), storage)
    if not close and condition_number(s) <= PROMOTE_COND:
        return svd, dtype
    return compact_svd(torch.as_tensor(w).double(), torch.float64), torch.float64


def basis_error(s: torch.Tensor, storage: torch.dtype, computed: torch.dtype) -> float:
    """First-order bound on ``||dB||_F`` of the polar basis: ``2 ||dW||_F / s_n``.

    ``dW`` is the stored rounding plus the SVD's backward error,
    ``(u_storage + eps_computed) ||W||_F``. For ``W = U S V^T`` the first-order change of
    ``B = U V^T`` is ``U Omega V^T + (I - U U^T) dW V S^-1 V^T`` with
    ``Omega_ij = (X_ij - X_ji) / (s_i + s_j)``, ``X = U^T dW V``; each part is at most
    ``||dW||_F / s_n``, so ``||dB||_F <= sqrt(2) ||dW||_F / s_n`` (just ``||dW||_F / s_n`` when
    square); the factor 2 leaves room for second-order terms. NaN when undefined.
    """
    s = torch.as_tensor(s).double()
    if not len(s) or not torch.isfinite(s).all() or float(s[-1]) <= 0:
        return math.nan
    fro = _frobenius(s)
    dw = (_unit_roundoff(storage) + torch.finfo(computed).eps) * fro
    return 2 * dw / float(s[-1])


def stability_error(err_a: float, err_b: float, n: int) -> float:
    """Bound on ``|dS|`` from the two bases' errors: ``(||dB_a||_F + ||dB_b||_F) / sqrt(n)``.

    ``dS = (tr(dB_a^T B_b) + tr(B_a^T dB_b)) / n`` and ``||B||_F = sqrt(n)`` (Cauchy-Schwarz).
    """
    return (err_a + err_b) / math.sqrt(n)


def _storage_of(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype.is_floating_point else torch.float64


def decompose(
    w: torch.Tensor, dtype: torch.dtype = torch.float32, storage: torch.dtype | None = None
) -> Decomposed:
    """SVD of one tall matrix and its polar basis ``U V^T`` (None with a reason when undefined).

    Args:
        w: ``(m, n)`` matrix.
        dtype: the engine's SVD precision; ill-conditioned matrices are redone in float64.
        storage: the precision the weights were stored in (default: ``w.dtype``).
    """
    w = torch.as_tensor(w)
    storage = storage or _storage_of(w)
    # check after the cast: finite float64 weights can overflow to Inf in float32
    if not torch.isfinite(w.to(dtype)).all():
        n = w.shape[1]
        nan = torch.full((n,), math.nan, dtype=dtype)
        empty = SVD(torch.empty(w.shape[0], 0, dtype=dtype), nan, torch.empty(0, n, dtype=dtype))
        return Decomposed(empty, None, "NaN/Inf in the weights")
    svd, computed = polar_svd(w, dtype, storage)
    reason = basis_reason(svd.S, tuple(w.shape), storage)
    basis = None if reason else svd.U @ svd.Vh
    return Decomposed(svd, basis, reason, basis_error(svd.S, storage, computed))


def stability(a: Decomposed, b: Decomposed) -> Measure:
    """The paper's ``S(a, b) = trace(B_a^T B_b) / n`` in [-1, 1]; NaN with a reason if undefined."""
    if a.basis is None or b.basis is None:
        return Measure(math.nan, a.reason or b.reason)
    if a.basis.shape != b.basis.shape:
        raise ValueError(
            f"Expected matrices of one shape but got {tuple(a.basis.shape)} and "
            f"{tuple(b.basis.shape)}."
        )
    n = min(a.basis.shape)  # the number of singular values, also for a wide matrix
    return Measure(float((a.basis * b.basis).sum()) / n)


def mean_stability(values: Sequence[float], sizes: Sequence[float]) -> float:
    """The network's mean S: the mean over layers weighted by their sizes ``m n``, over the
    layers whose S is defined (a NaN S, from a basis that is not unique, is left out); NaN
    when none is.

    Example:
        >>> mean_stability([1.0, 0.5, float("nan")], [100, 300, 50])
        0.625
    """
    s = np.asarray(values, dtype=np.float64)
    w = np.asarray(sizes, dtype=np.float64)
    known = ~np.isnan(s)
    if not known.any():
        return math.nan
    return float((s[known] * w[known]).sum() / w[known].sum())


def stability_bound(a: Decomposed, b: Decomposed) -> float:
    """Bound on the error of :func:`stability` (:func:`stability_error`); NaN where S is."""
    if a.basis is None or b.basis is None:
        return math.nan
    return stability_error(a.error, b.error, min(a.basis.shape))


def topk_reason(s: torch.Tensor, k: int, dtype: torch.dtype, dim: int | None = None) -> str | None:
    """Why the top-``k`` singular subspace of ``s`` is not unique, or None.

    ``dim`` is the larger side ``max(m, n)`` of the matrix: when it exceeds ``len(s)``, the
    subspace on that side also needs ``s_k > 0`` at ``k = len(s)`` (``s_{k+1}`` counts as 0).
    """
    if not 1 <= k <= len(s):
        return f"k={k} outside 1..{len(s)}"
    # only s_1..s_k+1 matter: the approximate mode knows just the top singular values
    if not torch.isfinite(s[: k + 1]).all():
        return "NaN/Inf in the weights or their SVD"
    if float(s[0]) <= 0:
        return "zero matrix: no subspace"
    gap_tol = 10 * len(s) * torch.finfo(dtype).eps * float(s[0])
    if k < len(s):
        if float(s[k - 1] - s[k]) <= gap_tol:
            return f"no spectral gap at k={k} (s_k = s_k+1): top-k subspace not unique"
    elif dim is not None and dim > len(s) and float(s[k - 1]) <= gap_tol:
        return f"no spectral gap at k={k} (s_k = 0, side of dim {dim}): top-k subspace not unique"
    return None


def subspace_overlap(q_a: torch.Tensor, q_b: torch.Tensor) -> float:
    """``||Q_a^T Q_b||_F^2 / k`` for two (d, k) matrices with orthonormal columns."""
    k = q_a.shape[1]
    return float((q_a.T @ q_b).pow(2).sum()) / k


def principal_angles(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(q_a.T @ q_b).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def matched_cosines(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """``|cos(q_a,i, q_b,i)|`` per matched column: which directions still rotate."""
    return (q_a * q_b).sum(0).abs()


def overlap(a: Decomposed, b: Decomposed, k: int) -> Overlap:
    """Top-k overlap of left (U) and right (V) singular subspaces; NaN with a reason if unclear."""
    dtype = a.svd.S.dtype
    dims = [max(x.svd.U.shape[0], x.svd.Vh.shape[1]) for x in (a, b)]
    reason = topk_reason(a.svd.S, k, dtype, dims[0]) or topk_reason(b.svd.S, k, dtype, dims[1])
    if reason:
        return Overlap(math.nan, math.nan, k, reason)
    left = subspace_overlap(a.svd.U[:, :k], b.svd.U[:, :k])
    right = subspace_overlap(a.svd.Vh[:k].T, b.svd.Vh[:k].T)
    return Overlap(left, right, k)


def pairwise_stability(bases: torch.Tensor) -> torch.Tensor:
    """``S`` between every pair of T snapshots at once: ``(T, m, n) -> (T, T)``.

    ``S[a, b] = trace(B_a^T B_b) / n`` for a stack of polar bases, as one matrix product (the
    engine's fast path; :func:`stability` is the one-pair definition it must agree with). Rows of
    undefined bases should be NaN-filled by the caller.
    """
    t, m, n = bases.shape
    flat = bases.reshape(t, m * n)
    return (flat @ flat.T) / min(m, n)


def pairwise_overlap(vectors: torch.Tensor) -> torch.Tensor:
    """``O_k`` between every pair of T snapshots at once: ``(T, d, k) -> (T, T)``.

    ``O[a, b] = ||Q_a^T Q_b||_F^2 / k`` for a stack of orthonormal ``(d, k)`` bases, from one
    ``(T k, T k)`` Gram matrix whose ``k x k`` blocks are the ``Q_a^T Q_b``.
    """
    t, d, k = vectors.shape
    wide = vectors.permute(1, 0, 2).reshape(d, t * k)  # columns: Q_0 | Q_1 | ... | Q_T-1
    blocks = (wide.T @ wide).reshape(t, k, t, k)
    return blocks.pow(2).sum(dim=(1, 3)) / k
