"""When to take a snapshot: small schedule objects, ``schedule(step) -> bool``.

Steps count optimizer steps from 1 (the step just taken). The initial weights (step 0) are taken
by the recorder itself when ``initial=True``.

Example:
    >>> every(10)(20), every(10)(25)
    (True, False)
    >>> sorted(logspaced(1, 1000, 4).steps)
    [1, 10, 100, 1000]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, expected, positive_int

__all__ = ["Schedule", "at", "every", "every_epoch", "logspaced", "parse_schedule"]


class Schedule:
    """Base class: decides, after optimizer step ``step``, whether to snapshot."""

    def __call__(self, step: int) -> bool:
        raise NotImplementedError

    def epoch_of(self, step: int) -> float:
        """The epoch to stamp on a snapshot at ``step`` (NaN when the schedule cannot tell)."""
        return float("nan")


@dataclass(frozen=True)
class every(Schedule):  # noqa: N801 - reads as a word: every(10)
    """Every ``n`` optimizer steps."""

    n: int

    def __post_init__(self) -> None:
        positive_int("n", self.n, "Use 1 for every step.")

    def __call__(self, step: int) -> bool:
        return step > 0 and step % self.n == 0


@dataclass(frozen=True)
class every_epoch(Schedule):  # noqa: N801
    """At the end of every epoch of ``steps_per_epoch`` optimizer steps (``len(loader)``)."""

    steps_per_epoch: int

    def __post_init__(self) -> None:
        positive_int("steps_per_epoch", self.steps_per_epoch, "Pass len(train_loader).")

    def __call__(self, step: int) -> bool:
        return step > 0 and step % self.steps_per_epoch == 0

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


@dataclass(frozen=True)
class at(Schedule):  # noqa: N801
    """At an explicit set of steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        chosen = frozenset(int(s) for s in steps)
        if not chosen or min(chosen) < 1:
            raise ConfigError(
                expected(
                    "steps",
                    "a non-empty set of steps >= 1",
                    sorted(chosen),
                    "Steps count optimizer steps from 1.",
                )
            )
        object.__setattr__(self, "steps", chosen)

    def __call__(self, step: int) -> bool:
        return step in self.steps


def logspaced(first: int, last: int, num: int) -> at:
    """``num`` steps spaced evenly in log scale from ``first`` to ``last`` (deduplicated)."""
    positive_int("first", first, "Use 1 for the first step.")
    positive_int("num", num, "Use e.g. 30.")
    if last < first:
        raise ConfigError(expected("last", f"at least first={first}", last, "Swap them."))
    return at(np.unique(np.round(np.geomspace(first, last, num)).astype(int)).tolist())


def parse_schedule(text: str, steps_per_epoch: int, total_steps: int | None = None) -> Schedule:
    """Parse the CLI's ``--schedule``: ``epoch``, ``every:N``, ``at:1,5,20``, ``log:N[:LAST]``.

    ``log:N`` spaces N snapshots in log scale from step 1 to ``total_steps`` (the whole run);
    ``log:N:LAST`` to step LAST.
    """
    kind, _, arg = text.partition(":")
    try:
        if kind == "epoch" and not arg:
            return every_epoch(steps_per_epoch)
        if kind == "every":
            return every(int(arg))
        if kind == "at":
            return at(int(s) for s in arg.split(","))
        if kind == "log":
            num, _, last = arg.partition(":")
            if not last and total_steps is None:
                raise ConfigError(
                    expected(
                        "schedule",
                        "'log:N:LAST' here",
                        text,
                        "Give the last step, e.g. log:30:5000.",
                    )
                )
            return logspaced(1, int(last) if last else total_steps, int(num))
    except ConfigError:
        raise
    except ValueError:
        pass
    raise ConfigError(
        expected(
            "schedule",
            "'epoch', 'every:N', 'at:S1,S2,...' or 'log:N[:LAST]'",
            text,
            'For example `schedule="every:10"`.',
        )
    )
