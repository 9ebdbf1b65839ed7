"""Singular values and the ranks derived from them (SPEC §4). Pure maths: tensors in, numbers out.

Every function takes the singular values ``s`` of one matrix, sorted in descending order, as a
1-D tensor (or anything ``torch.as_tensor`` accepts). A zero matrix has no meaningful rank ratio:
the ratios return NaN, the counts return 0.

Example:
    >>> import torch
    >>> s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    >>> stable_rank(s), energy_rank(s, 0.1)
    (1.3125, 2)

The rank OIALR keeps at a cut-off beta is a rule, not a measurement: it is
:func:`basis_stability.recommend.rules.rank_at_beta`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SVD",
    "batch_ranks",
    "compact_svd",
    "effective_rank",
    "energy_rank",
    "numerical_rank",
    "stable_rank",
]

SVD_DTYPES = (torch.float32, torch.float64)


class SVD(NamedTuple):
    """A compact SVD ``W = U diag(S) Vh``: U (m, n), S (n,), Vh (n, n) for a tall (m, n) W."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def compact_svd(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> SVD:
    """The compact SVD of ``w`` computed in ``dtype`` (float32 or float64, never half precision).

    Args:
        w: a 2-D matrix of any float dtype and device; ``(m, n)``.
        dtype: the precision of the decomposition.
    """
    if dtype not in SVD_DTYPES:
        raise ValueError(f"Expected `dtype` to be float32 or float64 but got {dtype}.")
    u, s, vh = torch.linalg.svd(torch.as_tensor(w).to(dtype), full_matrices=False)
    return SVD(u, s, vh)


def _s(s: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(s).to(torch.float64)


def stable_rank(s: torch.Tensor) -> float:
    """``||W||_F^2 / s_1^2``; NaN for a zero matrix."""
    s = _s(s)
    top = float(s[0]) if len(s) else 0.0
    return float((s**2).sum()) / top**2 if top > 0 else math.nan


def effective_rank(s: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p_i = s_i / sum(s)`` (Roy & Vetterli 2007); NaN for a zero matrix."""
    s = _s(s)
    total = float(s.sum())
    if total <= 0:
        return math.nan
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(s: torch.Tensor, eps: float = 0.1) -> int:
    """Smallest ``r`` with ``sum_{i<=r} s_i^2 >= (1 - eps) sum s_i^2``; 0 for a zero matrix."""
    if not 0 <= eps < 1:
        raise ValueError(f"Expected `eps` to be in [0, 1) but got {eps}.")
    e = _s(s) ** 2
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0)
    # a relative slack absorbs round-off, so eps=0 gives the full (numerical) rank
    need = (1 - eps) * total * (1 - 1e-12)
    return int((cum < need).sum()) + 1


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Singular values above ``max(m, n) * eps(dtype) * s_1`` (NumPy's ``matrix_rank`` rule)."""
    s = _s(s)
    if not len(s) or float(s[0]) <= 0:
        return 0
    tol = max(shape) * torch.finfo(dtype).eps * float(s[0])
    return int((s > tol).sum())


def batch_ranks(s: np.ndarray, eps: float = 0.1) -> dict[str, np.ndarray]:
    """Stable, effective and energy rank of many spectra at once (the engine's fast path).

    Args:
        s: ``(T, n)`` singular values, one descending spectrum per row; a row with a NaN is
            incomplete and gets NaN ranks (energy rank -1).
        eps: as :func:`energy_rank`.

    Returns:
        ``{"stable_rank", "effective_rank", "energy_rank"}``, each of length T, equal to the
        one-spectrum functions above row by row.
    """
    s = np.asarray(s, dtype=np.float64)
    complete = np.isfinite(s).all(axis=1)
    s = np.where(np.isfinite(s), s, 0.0)
    energy = s**2
    total, top, mass = energy.sum(axis=1), s[:, 0], s.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stable = np.where(top > 0, total / top**2, np.nan)
        p = s / mass[:, None]
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        effective = np.where(mass > 0, np.exp(-plogp.sum(axis=1)), np.nan)
    need = (1 - eps) * total * (1 - 1e-12)
    er = (np.cumsum(energy, axis=1) < need[:, None]).sum(axis=1) + 1
    er = np.where(total > 0, er, 0)
    return {
        "stable_rank": np.where(complete, stable, np.nan),
        "effective_rank": np.where(complete, effective, np.nan),
        "energy_rank": np.where(complete, er, -1),
    }
