"""Basis stability and top-k subspace overlap between two snapshots (SPEC §2, §3). Pure maths.

**Stability** ``S(a, b) = trace(B_a^T B_b) / n`` with ``B = U V^T`` the polar factor of the tall
``(m, n)`` matrix. ``B`` is unique exactly when the matrix has full column rank ``n``; then ``S``
is invariant to every SVD ambiguity (sign flips of singular pairs, rotations inside repeated
singular values). For a rank-deficient or zero matrix the columns of ``U`` and ``V`` belonging to
zero singular values are arbitrary, so ``B`` and ``S`` are not defined: the functions here return
NaN with the reason instead of a number that depends on the LAPACK routine.

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
from dataclasses import dataclass

import torch

from .spectra import SVD, compact_svd, numerical_rank

__all__ = [
    "Decomposed",
    "Measure",
    "Overlap",
    "basis_reason",
    "decompose",
    "matched_cosines",
    "overlap",
    "pairwise_overlap",
    "pairwise_stability",
    "principal_angles",
    "stability",
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
    """

    svd: SVD
    basis: torch.Tensor | None
    reason: str | None


def basis_reason(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why the polar basis of a matrix with singular values ``s`` is not unique, or None."""
    if not torch.isfinite(s).all():
        return "NaN/Inf in the weights or their SVD"
    if not len(s) or float(s[0]) <= 0:
        return "zero matrix: no basis"
    rank = numerical_rank(s, shape, dtype)
    if rank < len(s):
        return f"rank-deficient (numerical rank {rank} < {len(s)}): basis not unique"
    return None


def decompose(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> Decomposed:
    """SVD of one tall matrix and its polar basis ``U V^T`` (None with a reason when undefined)."""
    w = torch.as_tensor(w)
    # check after the cast: finite float64 weights can overflow to Inf in float32
    if not torch.isfinite(w.to(dtype)).all():
        n = w.shape[1]
        nan = torch.full((n,), math.nan, dtype=dtype)
        empty = SVD(torch.empty(w.shape[0], 0, dtype=dtype), nan, torch.empty(0, n, dtype=dtype))
        return Decomposed(empty, None, "NaN/Inf in the weights")
    svd = compact_svd(w, dtype)
    reason = basis_reason(svd.S, tuple(w.shape), dtype)
    return Decomposed(svd, None if reason else svd.U @ svd.Vh, reason)


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
