"""Analyse once, or keep analysing a run while it is being recorded (``bstab analyze --follow``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..store.h5io import writer_flagged
from ..store.reader import open_run
from .lag import LagTooLongError
from .output import check_dir, write_report
from .report import Report


def _count(path: Path) -> int:
    with open_run(path) as run:
        return run.n_snapshots


def _wait_for_first(path: Path, poll: float, idle_timeout: float) -> None:
    """Wait while the run is empty and its writer is open (analyze then says if it stays empty)."""
    since = time.monotonic()
    while _count(path) == 0 and writer_flagged(path) and time.monotonic() - since < idle_timeout:
        time.sleep(poll)


def follow_analysis(
    path: Path,
    out: Path,
    analyze: Callable[[], Report | None],
    plots: bool = True,
    follow: bool = False,
    poll: float = 5.0,
    idle_timeout: float = 600.0,
    force: bool = False,
) -> Iterator[str]:
    """Yield the report text after each analysis; with ``follow``, again for new snapshots.

    ``analyze()`` analyses the run at ``path`` once (e.g. ``lambda: bs.analyze(path, config)``);
    None means another rank of a distributed analysis writes.

        Following stops when the writer has closed the run, when no snapshot arrived for
        ``idle_timeout`` seconds (a writer that was killed looks open forever), or on Ctrl-C. With
        ``follow``, a run that has no snapshot yet is waited for under the same rules. Files in
        ``out`` named like an output that an earlier analysis did not write are never overwritten
        unless ``force`` (see :mod:`.output`); each write of a follow replaces the one before it.
    """
    # fail on a bad `out` before any SVD is paid for; create it later
    out = check_dir(out, plots=plots, force=force)
    if follow:
        _wait_for_first(path, poll, idle_timeout)
    while True:
        try:
            report = analyze()
        except LagTooLongError as exc:  # a live run may grow into a time lag: wait for it
            if not (follow and writer_flagged(path)):
                raise
            seen = _count(path)
            yield f"waiting for the run to span the lag: {exc}"
            if not _wait_for_more(path, seen, poll, idle_timeout):
                if writer_flagged(path):
                    yield f"no new snapshot for {idle_timeout:g} s; stopping."
                    return
                raise  # closed without reaching the lag: the error stands
            continue
        if report is None:  # a rank other than 0 of a distributed analysis: rank 0 writes
            return
        written = write_report(report, out, plots=plots, force=force)
        yield report.text() + f"\nwrote {len(written)} files to {out}"
        if not follow:
            return
        if not writer_flagged(path) and _count(path) == report.n_snapshots:
            yield "the writer closed the run; done."
            return
        if not _wait_for_more(path, report.n_snapshots, poll, idle_timeout):
            if writer_flagged(path):
                yield f"no new snapshot for {idle_timeout:g} s; stopping."
            else:
                yield "the writer closed the run; done."
            return


def _wait_for_more(path: Path, seen: int, poll: float, idle_timeout: float) -> bool:
    """Wait until the run has more than ``seen`` snapshots; False when its writer closed it
    without one or none arrived for ``idle_timeout`` seconds."""
    quiet_since = time.monotonic()
    while _count(path) == seen:
        if not writer_flagged(path) or time.monotonic() - quiet_since > idle_timeout:
            return False
        time.sleep(poll)
    return True
