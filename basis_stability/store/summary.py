"""A readable text summary of a run file (what ``bstab inspect`` prints)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .reader import Run, open_run


def human_size(n_bytes: int) -> str:
    """A byte count as people read it: ``512 B``, ``1.5 KiB``, ``2.0 MiB``, ``3.1 GiB``.

    Example:
        >>> human_size(1536)
        '1.5 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""  # unreachable


def _span(values: np.ndarray, fmt: str = "g") -> str:
    known = values[np.isfinite(values)] if values.dtype.kind == "f" else values[values >= 0]
    if not len(known):
        return "not recorded"
    return f"{known[0]:{fmt}} -> {known[-1]:{fmt}}"


def _step_span(steps: np.ndarray) -> str:
    """The steps' span, or ``not recorded`` when only the initial snapshot (step 0) has one."""
    later = steps[1:] if len(steps) and steps[0] == 0 else steps
    if not (later >= 0).any():  # every step after the initial weights is -1 (unknown)
        return "not recorded"
    return _span(steps, "d")


def _coverage_line(coverage: object) -> list[str]:
    """The ``coverage`` line from the run's config (nothing for runs recorded before it)."""
    if not isinstance(coverage, dict) or not coverage.get("eligible_2d_params"):
        return []
    recorded, eligible = int(coverage["recorded_params"]), int(coverage["eligible_2d_params"])
    line = (
        f"coverage   {recorded:,} of {eligible:,} parameters in >= 2-D tensors "
        f"({recorded / eligible:.1%})"
    )
    if recorded / eligible < 0.5:
        largest = ", ".join(
            f"{name} ({kind}, {n:,})" for name, kind, n in coverage.get("largest_unrecorded", [])
        )
        line += (
            " - most of the model is NOT recorded"
            + (f"; largest unrecorded: {largest}" if largest else "")
            + " (teach the registry a type with basis_stability.register_view)"
        )
    return [line]


def _state_line(run: Run) -> list[str]:
    """The ``state`` line (format 1.3): the biases and buffers stored, and what an export of a
    snapshot lacks (no line for a run older than 1.3, which does not say)."""
    index = run.state_index
    if not index.entries and index.model is None:
        return []
    values = sum(e.size for e in index.entries)
    line = (
        f"state      {len(index.entries)} biases/buffers per snapshot ({values:,} values)"
        if index.entries
        else "state      none (recorded with biases off)"
    )
    missing = index.missing({info.param_name for info in run.layers}) or []
    if not missing:
        return [line + ": exports are complete state dicts"]
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    total = len(index.model or ())
    return [f"{line}: exports lack {len(missing)} of {total} state-dict keys: {shown}"]


def nonfinite_counts(run: Run) -> dict[str, int]:
    """Per layer, how many committed snapshots hold a NaN or an Inf (reads every snapshot)."""
    counts = {}
    for info in run.layers:
        snaps = run.layer(info.name)
        counts[info.name] = sum(not np.isfinite(snaps[t]).all() for t in range(len(snaps)))
    return counts


def summarize(path: str | os.PathLike, scan: bool = True) -> str:
    """The ``bstab inspect`` text for ``path``."""
    with open_run(Path(path)) as run:
        a = run.attrs
        lines = [
            f"{run.path}  ({human_size(run.file_size())}, "
            f"format {a['format']} {a['format_version']})",
            f"model      {run.model_class}  (recorded {a.get('created', '?')} by basis_stability "
            f"{a.get('package_version', '?')}, torch {a.get('torch_version', '?')})",
            f"storage    {a.get('storage_dtype', '?')}",
            f"snapshots  {run.n_snapshots}   epochs {_span(run.epochs)}   "
            f"steps {_step_span(run.steps)}   wall time {_span(run.wall_time, '.1f')} s",
        ]
        bad = nonfinite_counts(run) if scan else {}
        total = sum(info.n_params for info in run.layers)
        lines.append(f"layers     {len(run.layers)} ({total:,} matrix entries per snapshot)")
        width = max([len(i.name) for i in run.layers] + [5])
        lines.append(
            f"  {'layer':{width}s}  {'kind':9s} {'matrix':>11s}  {'original':18s}"
            + ("  NaN/Inf" if scan else "")
        )
        for info in run.layers:
            mat = f"{info.shape[0]}x{info.shape[1]}"
            orig = "x".join(map(str, info.orig_shape)) + (" (T)" if info.transposed else "")
            flag = ""
            if scan:
                flag = f"  {bad[info.name]} snapshot(s) !" if bad[info.name] else "  none"
            lines.append(f"  {info.name:{width}s}  {info.kind:9s} {mat:>11s}  {orig:18s}{flag}")
        lines += _coverage_line(run.config.get("coverage"))
        lines += _state_line(run)
        skipped = run.config.get("skipped") or []
        if skipped:
            lines.append(f"skipped    {len(skipped)} layer(s) at recording:")
            lines += [f"  {name}: {reason}" for name, reason in skipped[:20]]
        lines += _metric_lines(run)
        events = run.events()
        if events:
            kinds = sorted({e.get("event", "?") for e in events})
            lines.append(f"events     {len(events)} ({', '.join(kinds)}); first: {events[0]}")
        if scan and any(bad.values()):
            lines.append("WARNING: some snapshots hold NaN/Inf weights (recorded as they were).")
    return "\n".join(lines)


def _metric_lines(run: Run) -> list[str]:
    names = run.metric_names
    if not names:
        return ["metrics    none"]
    values = run.metrics_array()
    out = [f"metrics    {', '.join(names)}"]
    for j, name in enumerate(names):
        col = values[:, j]
        seen = col[~np.isnan(col)]
        if len(seen):
            out.append(
                f"  {name:12s} {len(seen):5d} values  first {seen[0]:.4g}  "
                f"last {seen[-1]:.4g}  min {np.min(seen):.4g}  max {np.max(seen):.4g}"
            )
        else:
            out.append(f"  {name:12s} no values")
    return out
