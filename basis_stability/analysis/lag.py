"""The lag of the "lag" pairs and of the delay rule: so many snapshots, epochs or steps apart.

:meth:`Lag.parse` reads ``5`` (snapshots, the default), ``"5ep"`` / ``"5epochs"`` / ``"2.5ep"``
(epochs) and ``"200steps"`` / ``"200st"`` (optimizer steps); :func:`lag_pairs` turns a lag and
the run's snapshot index into the ``(a, b)`` pairs. Pure: numbers in, pairs and notes out.

**Pairing by elapsed time.** With a lag ``L`` in epochs (or steps) and ``t`` the epoch (or step)
column, each snapshot ``b`` is paired with the earlier snapshot ``a < b`` whose time is nearest
to ``t(b) - L``, ties going to the earlier one (the span at least ``L``), and only when
``|t(a) - (t(b) - L)| <= min(L, spacing) / 2``, ``spacing`` being the median positive gap between
consecutive snapshots with a known time. So a pair's elapsed time is within half a typical gap of
``L``, and between ``L / 2`` and ``3 L / 2``; ``b`` has no pair otherwise. A snapshot whose time is
unknown (epoch NaN or negative, step -1) has no lag pair. The snapshot distance ``b - a`` varies.

**Uneven spacing.** With a lag in snapshots the gaps ``d`` between consecutive snapshots are
measured in epochs (when every snapshot has one), else in steps (when every snapshot has one).
They are *uneven* when ``max(d) / min(d) > 1.5`` (a gap of 0 or a step back counts as uneven) and
still so without the first gap (when at least two remain): a snapshot of the initial weights at
step 0 followed by one every N steps from any step is even.

Example:
    >>> Lag.parse("2.5ep")
    Lag(value=2.5, unit='epochs')
    >>> lag_pairs(Lag.parse("5ep"), np.array([1.0, 2, 5, 10, 20]), np.full(5, -1)).pairs
    [(0, 2), (2, 3)]
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import ConfigError, expected

UNEVEN_RATIO = 1.5
_SUFFIXES = {
    "snapshots": ("", "snap", "snaps", "snapshot", "snapshots"),
    "epochs": ("ep", "epoch", "epochs"),
    "steps": ("st", "step", "steps"),
}
_UNIT_OF = {suffix: unit for unit, suffixes in _SUFFIXES.items() for suffix in suffixes}
_NUMBER = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)")
_WANTED = "a number of snapshots (5), epochs (5ep) or steps (200steps)"
_COLUMN = {"epochs": "epoch", "steps": "step"}


class LagTooLongError(ConfigError):
    """A time lag longer than the run spans so far (a run still being written may grow into it)."""


@dataclass(frozen=True)
class Lag:
    """How far apart the "lag" pairs are: ``value`` snapshots, epochs or optimizer steps.

    Attributes:
        value: a positive int for snapshots and steps, a positive float for epochs.
        unit: ``"snapshots"``, ``"epochs"`` or ``"steps"``.
    """

    value: int | float
    unit: str = "snapshots"

    @classmethod
    def parse(cls, value: int | str | Lag, name: str = "lag") -> Lag:
        """``5`` or ``"5"`` (snapshots), ``"5ep"``, ``"2.5epochs"``, ``"200steps"``, ``"200st"``.

        Raises:
            ConfigError: naming ``name``, the value and the fix, for anything else.
        """
        if isinstance(value, Lag):
            return cls._checked(value.value, value.unit, value, name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return cls._checked(int(value), "snapshots", value, name)
        match = _NUMBER.fullmatch(value.strip().lower()) if isinstance(value, str) else None
        if match is None or match[2] not in _UNIT_OF:
            fix = "Write a number, then ep or steps for a time; a bare number counts snapshots."
            raise ConfigError(expected(name, _WANTED, value, fix))
        return cls._checked(float(match[1]), _UNIT_OF[match[2]], value, name)

    @classmethod
    def _checked(cls, number: float, unit: str, given: object, name: str) -> Lag:
        if unit not in _SUFFIXES:
            raise ConfigError(expected(name, _WANTED, given, "Use snapshots, epochs or steps."))
        if not number > 0:  # NaN fails here too
            raise ConfigError(expected(name, "positive", given, "Use e.g. 5, 5ep or 200steps."))
        if not math.isfinite(number):
            raise ConfigError(expected(name, "finite", given, "Use e.g. 5, 5ep or 200steps."))
        if unit == "epochs":
            return cls(float(number), unit)
        if number != int(number):
            fix = f"Pass {number:g}ep for a lag in epochs." if unit == "snapshots" else ""
            raise ConfigError(expected(name, f"a whole number of {unit}", given, fix))
        return cls(int(number), unit)

    @property
    def column(self) -> str | None:
        """The snapshot-index column a time lag is measured in; None for snapshots."""
        return _COLUMN.get(self.unit)

    @property
    def given(self) -> int | str:
        """What plan.json records: ``5`` for snapshots, ``"5ep"`` or ``"200steps"``."""
        return self.value if self.unit == "snapshots" else str(self)

    def __str__(self) -> str:
        if self.unit == "epochs":
            return f"{self.value:g}ep"
        return f"{self.value}steps" if self.unit == "steps" else str(self.value)


@dataclass(frozen=True)
class LagPairs:
    """The lag pairs of a run and what was said about them.

    Attributes:
        lag: the lag as given.
        pairs: ``(a, b)`` snapshot pairs, ``b`` increasing, at most one per ``b``.
        snapshots: a lag in snapshots after it was reduced to fit the run; None for a time lag.
        notes: for the report (a reduced lag, snapshots without a time).
        warning: unevenly spaced snapshots paired by a lag in snapshots; None otherwise.
    """

    lag: Lag
    pairs: list[tuple[int, int]]
    snapshots: int | None = None
    notes: list[str] = field(default_factory=list)
    warning: str | None = None


def known_times(values: np.ndarray) -> np.ndarray:
    """Where an epoch or step is known: finite and >= 0 (a step of -1, an epoch of NaN is not)."""
    values = np.asarray(values, dtype=np.float64)
    return np.isfinite(values) & (values >= 0)


def lag_pairs(lag: Lag, epochs: np.ndarray, steps: np.ndarray) -> LagPairs:
    """The "lag" pairs of a run whose snapshots have these epochs and steps (``(T,)`` each).

    Raises:
        ConfigError: a time lag in a unit the run does not record, that exceeds what the run
            spans, or that no two snapshots are apart.
    """
    t_count = len(epochs)
    if lag.unit == "snapshots":
        used = min(lag.value, max(t_count - 1, 1))
        notes = []
        if t_count > 1 and used < lag.value:
            notes.append(f"the run has {t_count} snapshots: lag reduced from {lag.value} to {used}")
        note = uneven_note(used, epochs, steps)
        pairs = [(b - used, b) for b in range(used, t_count)]
        return LagPairs(lag, pairs, used, notes, note)
    times = np.asarray(epochs if lag.unit == "epochs" else steps, dtype=np.float64)
    if t_count < 2:  # nothing to pair; the report says so
        return LagPairs(lag, [])
    known = known_times(times)
    _check_time_lag(lag, times[known], epochs, steps)
    pairs = _time_pairs(times, known, float(lag.value))
    if not pairs:
        gap = _fmt(_spacing(times[known]), lag.unit)
        tol = _fmt(min(lag.value, _spacing(times[known])) / 2, lag.unit)
        raise ConfigError(
            expected(
                "lag",
                f"the time some pairs of snapshots are apart (to within {tol} {lag.unit})",
                str(lag),
                f"The snapshots are a median {gap} {lag.unit} apart: pass a lag of at least "
                f"{gap}{_suffix(lag.unit)}, or a lag in snapshots (e.g. 5).",
            )
        )
    notes = []
    if not known.all():
        missing = ", ".join(map(str, np.flatnonzero(~known)))
        notes.append(f"snapshot(s) {missing} record no {lag.column}: they have no lag pair")
    return LagPairs(lag, pairs, None, notes)


def _check_time_lag(lag: Lag, known: np.ndarray, epochs: np.ndarray, steps: np.ndarray) -> None:
    """A time lag needs two snapshots with a known time (``known``), and at most their span."""
    unit = lag.unit
    if len(known) < 2:
        has = "only one snapshot has one" if len(known) else "no snapshot has one"
        other = "steps" if unit == "epochs" else "epochs"
        alt = _alternative(other, epochs if other == "epochs" else steps)
        raise ConfigError(
            expected(
                "lag",
                f"in snapshots{' or ' + other if alt else ''} for this run, which records no "
                f"{unit} ({has}),",
                str(lag),
                f"Pass {alt + ' or ' if alt else ''}a number of snapshots (e.g. 5).",
            )
        )
    lo, hi = known.min(), known.max()
    if lag.value > hi - lo:
        raise LagTooLongError(
            expected(
                "lag",
                f"at most the {_fmt(hi - lo, unit)} {unit} the run spans "
                f"({unit} {_fmt(lo, unit)} to {_fmt(hi, unit)})",
                str(lag),
                "Pass a smaller lag, or record more of the training.",
            )
        )


def _alternative(unit: str, values: np.ndarray) -> str:
    """A lag in ``unit`` worth suggesting (5 median gaps), or "" when the run lacks ``unit``."""
    values = np.asarray(values, dtype=np.float64)
    known = values[known_times(values)]
    gap = _spacing(known)
    return f"{_fmt(5 * gap, unit)}{_suffix(unit)}" if gap > 0 else ""


def _time_pairs(times: np.ndarray, known: np.ndarray, lag: float) -> list[tuple[int, int]]:
    """The module's rule: for each b, the earlier snapshot nearest to ``t(b) - lag``, if near."""
    idx = np.flatnonzero(known)
    t = times[idx]
    tol = min(lag, _spacing(t)) / 2
    out = []
    for j in range(1, len(idx)):
        # tol <= lag / 2, so a match is at least lag / 2 before t(b): never a later time
        miss = np.abs(t[:j] - (t[j] - lag))
        i = int(np.argmin(miss))  # the first minimum: ties go to the earlier snapshot
        if miss[i] <= tol * (1 + 1e-9):  # slack for fractional epochs
            out.append((int(idx[i]), int(idx[j])))
    return out


def _spacing(t: np.ndarray) -> float:
    """The median positive gap between consecutive known times (0 when time never advances)."""
    gaps = np.diff(t)
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else 0.0


def _ratio(gaps: np.ndarray) -> float:
    return math.inf if (gaps <= 0).any() else float(gaps.max() / gaps.min())


def is_uneven(times: np.ndarray) -> bool:
    """The module's rule for uneven gaps between consecutive ``times`` (``(T,)``, all known)."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    if len(gaps) < 2:
        return False
    rest = gaps[1:] if len(gaps) >= 3 else gaps
    return _ratio(gaps) > UNEVEN_RATIO and _ratio(rest) > UNEVEN_RATIO


def uneven_note(lag: int, epochs: np.ndarray, steps: np.ndarray) -> str | None:
    """The warning for a lag in snapshots on unevenly spaced snapshots; None when even."""
    known = [
        (unit, np.asarray(values, dtype=np.float64))
        for unit, values in (("epochs", epochs), ("steps", steps))
        if len(values) and known_times(values).all()
    ]
    if not known or not is_uneven(known[0][1]):  # not measurable, or even
        return None
    unit, values = known[0]
    spans = values[lag:] - values[:-lag]
    note = (
        f"snapshots are unevenly spaced ({unit} {_listing(values, unit)}): a lag of {lag} snapshot"
        f"{'s' if lag > 1 else ''} pairs different time spans"
    )
    if len(spans) > 1:
        note += f" ({_fmt(spans.min(), unit)} to {_fmt(spans.max(), unit)} {unit})"
    if np.any(spans > 0):
        note += (
            f'; pass `lag="{_fmt(np.median(spans[spans > 0]), unit)}{_suffix(unit)}"` '
            "to pair by elapsed time"
        )
    return note


def _listing(values: np.ndarray, unit: str, most: int = 8) -> str:
    shown = [_fmt(v, unit) for v in values]
    return ", ".join(shown if len(shown) <= most else [*shown[:5], "…", *shown[-2:]])


def _fmt(value: float, unit: str = "epochs") -> str:
    if unit == "steps" and value == round(value):
        return str(int(round(value)))
    return f"{value:.4g}"


def _suffix(unit: str) -> str:
    return {"epochs": "ep", "steps": "steps"}.get(unit, "")


@dataclass(frozen=True)
class Interval:
    """How far apart the delay rule's pairs are: the plan's ``interval_*`` fields.

    Attributes:
        lag: the lag as given, recorded in the plan's rules: ``5`` (snapshots), ``"5ep"``.
        snapshots: snapshots apart (for a lag in time, the median over its pairs).
        epochs: epochs apart; None where the run records no epochs.
        steps: optimizer steps apart; None where the run records no steps.
    """

    lag: int | str
    snapshots: int
    epochs: float | None
    steps: int | None

    @classmethod
    def of_snapshots(cls, lag: int, index: pd.DataFrame) -> Interval:
        """A lag in snapshots: the elapsed epochs and steps of its pairs ``(b - lag, b)``, the
        median over the pairs whose two times are known (one number for evenly spaced
        snapshots; a summary for uneven ones, which the analysis warns about)."""
        if len(index) <= lag:
            return cls(lag, lag, None, None)
        spans: list[float | None] = []
        for column in ("epoch", "step"):
            t = index[column].to_numpy(np.float64)
            a, b = t[:-lag], t[lag:]
            ok = np.isfinite(a) & np.isfinite(b) & (a >= 0) & (b >= 0)
            span = float(np.median(b[ok] - a[ok])) if ok.any() else math.nan
            # unknown (NaN, -1) or not advancing: None, as a plan.json interval must be positive
            spans.append(span if span > 0 else None)
        epochs, steps = spans
        return cls(lag, lag, epochs, None if steps is None else max(1, round(steps)))


def interval_of(pairing: LagPairs, index: pd.DataFrame) -> Interval:
    """The plan's interval: a lag in snapshots as before; for a lag in time, the median over its
    pairs of the snapshots, epochs and steps apart (where the run records them)."""
    if pairing.snapshots is not None:
        return Interval.of_snapshots(pairing.snapshots, index)
    if not pairing.pairs:  # a one-snapshot run
        return Interval(pairing.lag.given, 1, None, None)
    a, b = (np.array(x) for x in zip(*pairing.pairs))
    medians = []
    for column in ("epoch", "step"):
        times = index[column].to_numpy(dtype=np.float64)
        ok = known_times(times[a]) & known_times(times[b])
        span = float(np.median(times[b][ok] - times[a][ok])) if ok.any() else math.nan
        medians.append(span if span > 0 else None)
    epochs, steps = medians
    snapshots = max(1, int(round(float(np.median(b - a)))))
    return Interval(pairing.lag.given, snapshots, epochs, None if steps is None else round(steps))
