"""Snapshot schedules: decisions against known answers, and clear errors for bad values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from basis_stability.errors import ConfigError
from basis_stability.recording.schedules import (
    at,
    every,
    every_epoch,
    logspaced,
    parse_schedule,
)


def _fired(schedule, last: int = 30) -> list[int]:
    return [s for s in range(0, last + 1) if schedule(s)]


def test_every_fires_on_multiples_and_never_at_step_zero():
    assert _fired(every(7)) == [7, 14, 21, 28]
    assert _fired(every(1), 5) == [1, 2, 3, 4, 5]
    assert _fired(every(np.int64(10))) == [10, 20, 30]
    assert math.isnan(every(3).epoch_of(6))


def test_every_epoch_fires_at_epoch_ends_and_stamps_epochs():
    sched = every_epoch(12)
    assert _fired(sched, 40) == [12, 24, 36]
    assert sched.epoch_of(24) == 2.0
    assert sched.epoch_of(6) == 0.5


def test_at_fires_only_on_its_steps():
    sched = at([20, 3, 3, 7])
    assert sched.steps == frozenset({3, 7, 20})
    assert _fired(sched) == [3, 7, 20]


@pytest.mark.parametrize(
    ("args", "steps"),
    [
        ((1, 1000, 4), {1, 10, 100, 1000}),
        ((1, 10, 20), set(range(1, 11))),  # rounding duplicates are dropped
        ((5, 5, 3), {5}),
        ((2, 32, 5), {2, 4, 8, 16, 32}),
    ],
)
def test_logspaced_known_answers(args, steps):
    assert logspaced(*args).steps == frozenset(steps)


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: every(0), "n"),
        (lambda: every(-3), "n"),
        (lambda: every(2.5), "n"),
        (lambda: every(True), "n"),
        (lambda: every_epoch(0), "steps_per_epoch"),
        (lambda: at([]), "steps"),
        (lambda: at([0, 4]), "steps"),
        (lambda: logspaced(0, 10, 3), "first"),
        (lambda: logspaced(1, 10, 0), "num"),
        (lambda: logspaced(10, 5, 3), "last"),
    ],
)
def test_bad_values_raise_config_error_naming_the_argument(make, arg):
    with pytest.raises(ConfigError, match=f"Expected `{arg}`"):
        make()


def test_parse_schedule_strings():
    assert parse_schedule("epoch", 50) == every_epoch(50)
    assert parse_schedule("every:10", 50) == every(10)
    assert parse_schedule("at:1,5,20", 50) == at([1, 5, 20])
    assert parse_schedule("log:4:1000", 50) == at([1, 10, 100, 1000])


@pytest.mark.parametrize("text", ["", "weekly", "every:", "every:x", "at:1,b", "epoch:3", "log:4"])
def test_parse_schedule_rejects_bad_strings(text):
    with pytest.raises(ConfigError, match="Expected `schedule`") as info:
        parse_schedule(text, 50)
    assert repr(text) in str(info.value)


def test_parse_schedule_keeps_the_inner_argument_error():
    with pytest.raises(ConfigError, match="Expected `n`"):
        parse_schedule("every:0", 50)
