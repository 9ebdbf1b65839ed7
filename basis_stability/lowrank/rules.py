"""The rules of OIALR, pure functions shared by the controller, the offline plan and the export
(SPEC §5.3): which rank an update keeps, when thin factors pay, and auto mode's delay streak.

A layer of tall shape (m, n) held as thin factors costs ``k (m + n)`` entries (and multiply-adds
per output position) against ``m n`` dense: the factors pay only while ``k (m + n) < m n``, that
is ``k <= largest_paying_rank(m, n)``.

Example:
    >>> largest_paying_rank(64, 64), factors_pay(32, 64, 64), factors_pay(31, 64, 64)
    (31, False, True)
    >>> next_rank(64, [1.0] * 10 + [0.01] * 54, beta=0.15, m=64, n=64)  # halving cap 32 > 31
    31
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CAP_ROUNDINGS = ("ceil", "floor")


def factors_pay(k: int, m: int, n: int) -> bool:
    """Whether rank-``k`` thin factors of an m x n matrix hold fewer entries than it."""
    return k * (m + n) < m * n


def largest_paying_rank(m: int, n: int) -> int:
    """The largest k with ``k (m + n) < m n`` (0 when no rank pays, e.g. a 1-column matrix)."""
    return (m * n - 1) // (m + n)


def beta_rank(s: Sequence[float], beta: float) -> int:
    """``#{s_i >= beta s_1}`` of descending singular values (0 for a zero matrix)."""
    values = [float(v) for v in s]
    if not values or values[0] <= 0:
        return 0
    return sum(v >= beta * values[0] for v in values)


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
    keep = beta_rank(values, beta) if values and values[0] > 0 else k  # all zero: no cut
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


def delay_streak(share: float, streak: int, needed: float, patience: int) -> tuple[int, bool]:
    """Auto mode's delay rule at one check: the new count of checks in a row whose stable share
    reached ``needed``, and whether it has held for ``patience`` checks (convert now).

    Example:
        >>> delay_streak(0.95, 1, 0.9, 2), delay_streak(0.5, 1, 0.9, 2)
        ((2, True), (0, False))
    """
    streak = streak + 1 if share >= needed else 0
    return streak, streak >= patience


def trainable_entries(k: int | None, m: int, n: int) -> int:
    """Trainable entries of a layer after OIALR: ``k^2`` (its S), or ``m n`` when dense (None)."""
    return m * n if k is None else k * k
