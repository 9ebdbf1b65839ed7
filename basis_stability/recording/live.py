"""The recorder's side of live measurements (``Recorder(..., live=...)``): a protocol, and a
guard that never lets a measurement break or stop the recording.

What is measured lives in a later stage (the basis stability S:
:class:`basis_stability.analysis.live.LiveStability`), which the recorder does not import: it
only calls the protocol below. ``live.start(views)`` gives an observer; after each committed
snapshot the recorder hands it the snapshot's host arrays (the copy it made for the write, on
the background writer thread when ``background=True``); the training thread takes the values.

A failure anywhere in the observer (TensorBoard's disk full, a bug) stops the live values, not
the recording: it is logged and warned of once (``RuntimeWarning``), on the training thread,
and the recorder goes on writing snapshots. Their cost is not silent either: a snapshot that
waits more than :data:`SLOW` seconds for the measurement of the one before (or, with
``background=False``, for its own) is logged once as a warning, and ``close()`` logs the total
time spent measuring.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, expected
from ..views import LayerView

log = logging.getLogger(__name__)

#: one snapshot's live values: its step and ``{tag: value}``
LiveValues = tuple[int, dict[str, float]]
#: seconds a snapshot may wait for a live measurement before it is logged (once)
SLOW = 0.1


class LiveObserver(Protocol):
    """What ``live.start(views)`` returns."""

    def observe(self, step: int, matrices: Sequence[np.ndarray], storage: str) -> None: ...

    def take(self) -> list[LiveValues]: ...

    def close(self) -> None: ...


@runtime_checkable
class LiveOption(Protocol):
    """What ``Recorder(..., live=...)`` takes, e.g. ``LiveStability(tensorboard="runs/tb")``."""

    def start(self, views: Sequence[LayerView]) -> LiveObserver: ...


def check_live(live: Any) -> None:
    """Refuse a ``live`` that is neither None nor a live option."""
    if live is not None and not isinstance(live, LiveOption):
        raise ConfigError(
            expected(
                "live",
                "None or a basis_stability.LiveStability",
                live,
                "E.g. live=bs.LiveStability(tensorboard='runs/tb').",
            )
        )


class LiveHook:
    """Runs one observer for a recorder and keeps its first failure (see the module docstring).

    Args:
        live: the option (``LiveStability(...)``); its ``start`` is called here.
        views: the recorded layers, in the order of the matrices a snapshot hands over.
        path: the run file, named in the warning.
    """

    def __init__(self, live: LiveOption, views: Sequence[LayerView], path: Path) -> None:
        self.path = path
        self.snapshots = 0  # snapshots observed
        self.seconds = 0.0  # spent observing them
        self.last = 0.0  # seconds the last observation took
        self._slow_logged = False
        self._observer: LiveObserver | None = None
        self._failure: BaseException | None = None
        self._reported = False
        self._left: list[LiveValues] = []  # values not taken when the observer closed
        self._observer = self._guard("start", live.start, views)

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # never let a measurement stop the recording
            if self._failure is None:
                self._failure = exc
                log.warning("live values of %s stopped (%s): %s", self.path, what, exc)
            self._observer = None
            return None

    def observe(self, step: int, matrices: Sequence[np.ndarray], storage: str) -> None:
        """Measure one committed snapshot (on the thread that wrote it)."""
        observer = self._observer
        if observer is None:
            return
        start = time.perf_counter()
        try:
            self._guard("observe", observer.observe, step, matrices, storage)
        finally:
            self.last = time.perf_counter() - start
            self.seconds += self.last
            self.snapshots += 1

    def waited(self, seconds: float) -> None:
        """A snapshot waited ``seconds`` for a measurement: logged once when over :data:`SLOW`."""
        if seconds > SLOW and not self._slow_logged:
            self._slow_logged = True
            log.warning(
                "a snapshot of %s waited %.2f s for the live values (one float64 SVD per layer "
                "and snapshot): snapshot less often, or record without live=",
                self.path,
                seconds,
            )

    def take(self) -> list[LiveValues]:
        """The values measured since the last call (warning of a failure first, once)."""
        self.report()
        observer, left, self._left = self._observer, self._left, []
        return left + ((self._guard("take", observer.take) if observer is not None else None) or [])

    def report(self) -> None:
        """Warn of the first failure, once (call on the training thread)."""
        if self._failure is None or self._reported:
            return
        self._reported = True
        exc = self._failure
        warnings.warn(
            f"The live values of the recording {self.path} stopped after {self.snapshots} "
            f"snapshots: {type(exc).__name__}: {exc}. The recording goes on without them; "
            "basis_stability.analyze() on the run gives the same stability afterwards.",
            RuntimeWarning,
            stacklevel=3,
        )

    def close(self) -> None:
        """Close the observer; the values it has not handed out yet stay for :meth:`take`."""
        log.info(
            "live values of %s: %d snapshots measured in %.2f s",
            self.path,
            self.snapshots,
            self.seconds,
        )
        observer = self._observer
        if observer is not None:
            self._left += self._guard("take", observer.take) or []
            self._observer = None
            try:
                observer.close()
            except Exception as exc:  # as a failure while observing: warned of, not raised
                self._failure = self._failure or exc
        self.report()
