"""What the framework adapters share: optional imports, schedules by name, a recording session."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, MissingExtraError, expected, require
from ..recording.live import LiveOption, check_live
from ..recording.recorder import Recorder
from ..recording.schedules import Schedule

log = logging.getLogger(__name__)

# MissingExtraError and require live in errors.py; the adapters import them from here
__all__ = ["MissingExtraError", "RecordSession", "require", "scalars", "schedule_from"]


def schedule_from(spec: Schedule | str | None) -> Schedule | None:
    """A step schedule from a Schedule, ``"every:N"``, ``"at:1,5,9"`` or ``"log:N:LAST"``;
    None or ``"epoch"`` means: at the end of every epoch."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        if spec == "epoch":
            return None
        from ..recording.schedules import parse_schedule

        return parse_schedule(spec, steps_per_epoch=1)
    raise ConfigError(
        expected(
            "schedule",
            "None, 'epoch', 'every:N', 'at:1,5,9', 'log:N:LAST' or a Schedule",
            spec,
            "Use e.g. every(50) from basis_stability.recording.",
        )
    )


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-NaN scalar entries of a metrics mapping (tensors of one element included)."""
    out = {}
    for name, value in metrics.items():
        if hasattr(value, "numel"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[str(name)] = float(value)
    return out


class RecordSession:
    """One recording across a framework's fit, its checkpoints and its resumption.

    The framework calls :meth:`open` when training starts, :meth:`step` after every optimizer
    step, :meth:`epoch_end` at the end of every epoch, :meth:`state`/:meth:`restore` with its
    checkpoints and :meth:`close` at the end. A restored session appends to the same run, after
    the snapshots that existed when the checkpoint was taken. With ``live``, the framework
    calls :meth:`send_live` after its snapshots to hand the live values to its loggers.
    """

    def __init__(
        self,
        path: str | Path,
        schedule: Schedule | str | None = None,
        *,
        mode: str = "create",
        record: Mapping[str, Any] | None = None,
        live: LiveOption | None = None,
    ) -> None:
        check_live(live)
        self.live = live
        self._sending = True  # False once sending live values to the framework failed
        self.path = Path(path)
        self.schedule = schedule_from(schedule)
        self.mode = mode
        self.record = dict(record or {})
        self.recorder: Recorder | None = None
        self.resume_at: int | None = None  # snapshots in the run when the checkpoint was taken
        self.resume_step: int | None = None  # the checkpoint's optimizer step
        self.current_step = 0
        self.last_step = -1
        self._closed_count: int | None = None

    def open(self, model: nn.Module) -> Recorder:
        if self.recorder is None:
            resuming = self.resume_at is not None
            self.recorder = Recorder(
                model,
                self.path,
                mode="append" if resuming else self.mode,
                keep=self.resume_at,
                resume_step=self.resume_step,
                live=self.live,
                **self.record,
            )
        return self.recorder

    def resume_after_step(self, step: int) -> None:
        """Resume after the snapshots taken up to optimizer step ``step`` (the checkpoint's)."""
        from .. import _dist
        from ..store.reader import open_run

        if not (_dist.is_writer() and self.path.exists()):
            return
        with open_run(self.path) as run:
            steps = run.steps
        self.resume_at = int((steps <= step).sum())
        self.resume_step = self.last_step = step

    def step(self, step: int, epoch: float, metrics: Mapping[str, Any] | None = None) -> None:
        """After optimizer step ``step`` (counted from 1): snapshot if the schedule says so."""
        self.current_step = step
        if self.recorder is None or self.schedule is None or step == self.last_step:
            return
        if self.schedule(step):
            self.last_step = step
            self.recorder.snapshot(step=step, epoch=epoch, metrics=scalars(metrics or {}))

    def epoch_end(self, epoch: float, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        self.current_step = step
        if self.recorder is None or self.schedule is not None:
            return
        self.last_step = step
        self.recorder.snapshot(step=step, epoch=epoch, metrics=scalars(metrics or {}))

    def send_live(self, send: Callable[[int, dict[str, float]], None], wait: bool = False) -> None:
        """Hand the live values measured since the last call to ``send(step, values)`` (the
        framework's loggers), oldest first; ``wait``: first wait for the snapshots in flight.
        A failure of ``send`` is warned of once and stops the sending, never the recording."""
        if self.recorder is None or self.live is None:
            return
        for step, values in self.recorder.live_metrics(wait=wait):
            if not self._sending:
                continue
            try:
                send(step, values)
            except Exception as exc:  # the loggers' failure: the recording goes on
                self._sending = False
                log.warning("could not log the live values of %s: %s", self.path, exc)
                warnings.warn(
                    f"Logging the live values of the recording {self.path} to the framework's "
                    f"loggers failed ({type(exc).__name__}: {exc}); no more are sent. The "
                    "recording goes on.",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def snapshots(self) -> int:
        """Snapshots in the run (counted on the writing rank; other ranks report 0)."""
        if self.recorder is not None:
            return self.recorder.n_snapshots
        return self._closed_count if self._closed_count is not None else self.resume_at or 0

    def state(self) -> dict[str, Any]:
        """What a training checkpoint keeps of the recording: the snapshots it counts are in the
        run (a background write in flight is waited for)."""
        if self.recorder is not None:
            self.recorder.flush()
        return {
            "path": str(self.path),
            "snapshots": self.snapshots(),
            "step": self.current_step,
            "last_step": self.last_step,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if Path(state.get("path", self.path)) != self.path:
            log.warning(
                "the checkpoint recorded into %s; this callback records into %s (appending there)",
                state.get("path"),
                self.path,
            )
        self.resume_at = int(state["snapshots"]) if state.get("snapshots") else None
        self.resume_step = int(state["step"]) if state.get("step") is not None else None
        self.last_step = int(state.get("last_step", -1))

    def close(self) -> None:
        if self.recorder is not None:
            self._closed_count = self.recorder.n_snapshots
            self.recorder.close()
            self.recorder = None
