"""What a report says about the run file itself: its metadata, and whether it is still written.

Read from the store only (no analysis), so a missing or damaged run fails here, before any SVD.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..store.lock import live_status
from ..store.reader import Run, open_run
from ..store.summary import human_size, summarize


@dataclass(frozen=True)
class RunInfo:
    """A run's metadata as the report shows it.

    Attributes:
        path: the run file.
        rows: ``(label, value)`` pairs of the metadata table, in reading order.
        n_snapshots: the committed snapshots when it was read.
        live: why the run may still change (a writer holds it, or one left it open), or None
            for a run closed cleanly.
        skipped: ``(layer, reason)`` of the layers the recorder skipped.
        inspect: the ``bstab inspect`` text of the run (without the NaN/Inf scan).
    """

    path: Path
    rows: list[tuple[str, str]]
    n_snapshots: int
    live: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    inspect: str = ""


def read_run_info(path: str | os.PathLike) -> RunInfo:
    """The metadata of the run at ``path`` (one open, reading only the small tables).

    Raises:
        RunFileError: the file is missing or not a run; DamagedRunError: it is damaged.

    Example:
        >>> read_run_info("runs/cnn-digits-seed0.h5").n_snapshots  # doctest: +SKIP
        41
    """
    path = Path(path)
    live = live_status(path)  # before the open, which may wait for a live writer's flush
    with open_run(path) as run:
        rows, count = metadata_rows(run), run.n_snapshots
        skipped = [(str(n), str(r)) for n, r in run.config.get("skipped") or []]
    return RunInfo(path, rows, count, live, skipped, summarize(path, scan=False))


def _date(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(values: np.ndarray, fmt: str = "g") -> str:
    """First -> last of the known values (NaN, or -1 for steps, is unknown)."""
    known = values[np.isfinite(values)] if values.dtype.kind == "f" else values[values >= 0]
    if not len(known):
        return "not recorded"
    span = f"{known[0]:{fmt}} → {known[-1]:{fmt}}"
    if len(known) < len(values):  # '0 → 0' alone would read as every snapshot at step 0
        span += f" (recorded at {len(known)} of {len(values)} snapshots)"
    return span


def metadata_rows(run: Run) -> list[tuple[str, str]]:
    """The metadata table of an open run: the file, the model, the versions, the dates, the
    snapshots and what each holds."""
    a, index = run.attrs, run.index()
    unix = index["unix_time"].astype(np.float64)
    unix = unix[np.isfinite(unix) & (unix > 0)]
    total = sum(info.n_params for info in run.layers)
    rows = [
        ("file", f"{run.path} ({human_size(run.file_size())})"),
        ("format", f"{a.get('format', '?')} {a.get('format_version', '?')}"),
        ("model class", run.model_class or "?"),
        (
            "recorded with",
            f"basis_stability {a.get('package_version', '?')}, torch {a.get('torch_version', '?')}",
        ),
        ("created", str(a.get("created", "?"))),
        ("snapshots", f"{run.n_snapshots} committed"),
        ("snapshot dates", f"{_date(unix[0])} → {_date(unix[-1])}" if len(unix) else "?"),
        ("epochs", _span(index["epoch"])),
        ("steps", _span(index["step"], "d")),
        ("wall time (s)", _span(index["wall_time"], ".1f")),
        ("storage dtype", str(a.get("storage_dtype", "?"))),
        ("layers", f"{len(run.layers)} ({total:,} matrix entries per snapshot)"),
    ]
    coverage = run.config.get("coverage")
    if isinstance(coverage, dict) and coverage.get("eligible_2d_params"):
        got, of = int(coverage["recorded_params"]), int(coverage["eligible_2d_params"])
        rows.append(("coverage", f"{got:,} of {of:,} parameters in ≥ 2-D tensors ({got / of:.1%})"))
    return rows + _metric_rows(run)


def _metric_rows(run: Run) -> list[tuple[str, str]]:
    """One row per metric: its last logged value (and the snapshot it came with)."""
    values = run.metrics_array()
    rows = []
    for j, name in enumerate(run.metric_names):
        seen = np.flatnonzero(~np.isnan(values[:, j]))
        last = f"{values[seen[-1], j]:.4g} (snapshot {seen[-1]})" if len(seen) else "no values"
        rows.append((f"metric {name}", f"last {last}"))
    return rows
