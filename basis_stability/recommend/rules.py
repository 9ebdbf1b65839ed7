"""The rules of OIALR, pure functions shared by the controller, the offline plan and the export
(SPEC §5.3): which rank an update keeps, when thin factors pay, the delay rule (the stable
share and its streak) and the beta rule.

A layer of tall shape (m, n) held as thin factors costs ``k (m + n)`` entries (and multiply-adds
per output position) against ``m n`` dense: the factors pay only while ``k (m + n) < m n``, that
is ``k <= largest_paying_rank(m, n)``.

Example:
    >>> largest_paying_rank(64, 64), factors_pay(32, 64, 64), factors_pay(31, 64, 64)
    (31, False, True)
    >>> next_rank(64, [1.0] * 10 + [0.01] * 54, beta=0.15, m=64, n=64)  # halving cap 32 > 31
    31

The analysis measures, these rules decide: the plan (:mod:`.plan`), auto mode and
``bstab train`` all call them, so the three cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, expected

CAP_ROUNDINGS = ("ceil", "floor")


def factors_pay(k: int, m: int, n: int) -> bool:
    """Whether rank-``k`` thin factors of an m x n matrix hold fewer entries than it."""
    return k * (m + n) < m * n


def largest_paying_rank(m: int, n: int) -> int:
    """The largest k with ``k (m + n) < m n`` (0 when no rank pays, e.g. a 1-column matrix)."""
    return (m * n - 1) // (m + n)


def _values(s: Any) -> np.ndarray:
    """Descending singular values as float64: a sequence, an array or a (CPU or GPU) tensor."""
    if hasattr(s, "detach"):  # a torch tensor, without importing torch here
        s = s.detach().cpu().double().numpy()
    return np.asarray(s, dtype=np.float64).reshape(-1)


def check_beta(beta: Any) -> float:
    """The cut-off beta must be a number in (0, 1): the one check of it.

    Raises:
        ConfigError: naming ``beta``, its value and the usual choice.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 1:
        raise ConfigError(
            expected("beta", "in (0, 1)", beta, "The reference uses 0.15; larger cuts more.")
        )
    return float(beta)


def rank_at_beta(s: Any, beta: float) -> int:
    """The beta rule: ``#{i : s_i >= beta s_1}`` of descending singular values ``s``; 0 for a
    zero (or empty) spectrum, which has nothing to keep.

    Used by the controller's cuts (:func:`next_rank`), the offline plan and the analysis'
    ``rank_beta`` column: one definition, so the three agree.

    Raises:
        ConfigError: ``beta`` outside (0, 1).

    Example:
        >>> rank_at_beta([4.0, 2.0, 1.0, 0.5], 0.25)  # 1.0 >= 0.25 * 4 is kept
        3
    """
    check_beta(beta)
    values = _values(s)
    if not len(values) or not values[0] > 0:
        return 0
    return int((values >= beta * values[0]).sum())


def min_rank(n: int, min_rank_share: float) -> int:
    """The floor under every cut: ``max(1, int(min_rank_share * n))``."""
    return max(1, int(min_rank_share * n))


def next_rank(
    k: int,
    s: Sequence[float],
    beta: float,
    m: int,
    n: int,
    max_cut: float = 0.5,
    cap_rounding: str = "ceil",
    min_rank_share: float = 0.01,
    dense_when_larger: bool = True,
) -> int | None:
    """The rank a layer of current rank ``k`` keeps at an update, or None: it is (or goes back
    to being) dense.

    ``s`` are the descending singular values of its current k x k S (of W, k = n, for a dense
    layer). The beta rule keeps ``#{s_i >= beta s_1}``; a cut removes at most ``max_cut`` of k
    (the kept share ``k (1 - max_cut)`` rounded by ``cap_rounding``) and never goes under
    :func:`min_rank`. With ``dense_when_larger``, a layer whose beta rank does not pay
    (:func:`factors_pay`) is dense (None), and a cut stops at :func:`largest_paying_rank` when
    the cap alone would leave it there or above (a square layer halves from 64 to 31, not 32).
    """
    values = [float(v) for v in s]
    keep = rank_at_beta(values, beta) if values and values[0] > 0 else k  # all zero: no cut
    paying = largest_paying_rank(m, n)
    if dense_when_larger and keep > paying:
        return None
    if keep >= k:
        return k
    kept_share = k * (1 - max_cut)
    cap = math.floor(kept_share) if cap_rounding == "floor" else math.ceil(kept_share)
    new = min(k, max(keep, cap, min_rank(n, min_rank_share)))
    if dense_when_larger:
        new = max(min(new, paying), keep)
    return new


def stable_share(values: Any, sizes: Any, tau: float) -> float:
    """The delay rule's measure at one snapshot (or check): the parameter-weighted share of
    layers with ``S >= tau`` among those whose S is defined.

    A layer whose S is NaN (its basis is not unique, or its weights are NaN/Inf) is left out,
    counted neither as stable nor as unstable. NaN when no layer has a defined S.

    Args:
        values: S per layer.
        sizes: the layers' parameter counts ``m n``, in the same order.
        tau: the stability threshold.

    Example:
        >>> stable_share([0.995, 0.5, float("nan")], [100, 300, 50], 0.99)
        0.25
    """
    values, sizes = np.asarray(values, np.float64), np.asarray(sizes, np.float64)
    known = ~np.isnan(values)
    total = sizes[known].sum()
    if not total > 0:
        return math.nan
    return float(sizes[known & (values >= tau)].sum() / total)


def streak(shares: Sequence[float], needed: float) -> int:
    """How many of the last ``shares`` in a row reached ``needed`` (NaN never does)."""
    count = 0
    for share in reversed(shares):
        if not share >= needed:
            break
        count += 1
    return count


def delay_start(shares: Sequence[float], needed: float, patience: int | None = None) -> int | None:
    """The delay rule over a series of stable shares (one per snapshot, or per check).

    With ``patience`` (auto mode, which cannot see ahead) it is the index where the first run of
    ``patience`` shares in a row ``>= needed`` starts: the controller converts as soon as that
    run is complete. With ``patience=None`` (the offline plan, which has the whole run) the run
    must last to the last share: the first index from which the share never drops below
    ``needed`` again. None when the rule is not met. A NaN share (no layer has a defined S)
    never meets it.

    Example:
        >>> shares = [0.5, 0.95, 0.97, 0.4, 0.96, 0.99]
        >>> delay_start(shares, 0.9, patience=2), delay_start(shares, 0.9)
        (1, 4)
    """
    ok = np.asarray(shares, dtype=np.float64) >= needed
    if patience is None:
        return first_lasting(ok)
    count = 0
    for i, good in enumerate(ok):
        count = count + 1 if good else 0
        if count >= patience:
            return i - patience + 1
    return None


def trainable_entries(k: int | None, m: int, n: int) -> int:
    """Trainable entries of a layer after OIALR: ``k^2`` (its S), or ``m n`` when dense (None)."""
    return m * n if k is None else k * k


def first_lasting(ok: np.ndarray) -> int | None:
    """Index of the first element from which ``ok`` is True to the end; None if the last is not.

    Example:
        >>> first_lasting(np.array([False, True, False, True, True]))
        3
    """
    tail_ok = np.logical_and.accumulate(np.asarray(ok, dtype=bool)[::-1])[::-1]
    return int(np.argmax(tail_ok)) if tail_ok.any() else None


def kept_energy(s: np.ndarray, rank: int) -> float:
    """The spectral energy ``sum_{i<=r} s_i^2 / sum s_i^2`` the top ``rank`` values keep."""
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    return float(e[:rank].sum() / total) if total > 0 else math.nan


def ranks_at(spectra: dict[str, np.ndarray], beta: float) -> dict[str, int]:
    """:func:`rank_at_beta` of every layer's spectrum."""
    return {name: rank_at_beta(s, beta) for name, s in spectra.items()}


def expected_share(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    """Trainable share after OIALR of layers cut to ``ranks``: ``k^2`` each, or ``m n`` for a
    layer whose factors would not pay (it stays dense, as the controller keeps it)."""
    total = sum(m * n for m, n in shapes.values())
    kept = sum(
        trainable_entries(r if factors_pay(r, *shapes[name]) else None, *shapes[name])
        for name, r in ranks.items()
    )
    return kept / total


def beta_curve(
    spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], betas: tuple[float, ...]
) -> pd.DataFrame:
    """Trainable share and kept energy for each candidate beta, from one snapshot's spectra.

    The share is the controller's: a layer whose beta rank would not pay as thin factors
    (``k (m + n) >= m n``) stays dense and counts all its entries (:func:`expected_share`).
    """
    rows = []
    for beta in betas:
        ranks = ranks_at(spectra, beta)
        energies = [kept_energy(spectra[name], r) for name, r in ranks.items()]
        rows.append(
            {
                "beta": beta,
                "trainable_share": expected_share(ranks, shapes),
                "min_energy": float(np.nanmin(energies)),
                "mean_energy": float(np.nanmean(energies)),
            }
        )
    return pd.DataFrame(rows)


def choose_beta(curve: pd.DataFrame, cfg: Any) -> tuple[float, str]:
    """The beta rule applied to a :func:`beta_curve`: ``cfg.beta_rule`` "energy" (the largest
    beta keeping ``cfg.min_energy`` in every layer) or "share" (the smallest beta whose share
    is at most ``cfg.target_share``); ``cfg`` is a :class:`~.plan.PlanConfig`."""
    if cfg.beta_rule == "energy":
        fits = curve[curve["min_energy"] >= cfg.min_energy]
        if fits.empty:
            return float(curve["beta"].min()), (
                f"no beta keeps {cfg.min_energy:.0%} energy in every layer; using the smallest"
            )
        return float(fits["beta"].max()), (
            f"largest beta keeping >= {cfg.min_energy:.0%} spectral energy in every layer"
        )
    fits = curve[curve["trainable_share"] <= cfg.target_share]
    if fits.empty:
        return float(curve["beta"].max()), (
            f"no beta reaches a trainable share <= {cfg.target_share:.0%}; using the largest"
        )
    return float(fits["beta"].min()), (
        f"smallest beta with trainable share <= {cfg.target_share:.0%}"
    )
