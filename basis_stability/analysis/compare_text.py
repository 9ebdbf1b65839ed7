"""The text ``bstab compare`` prints: a table of the runs, one of final S per layer, the notes."""

from __future__ import annotations

import math

from .compare import SHOWN_METRICS, Comparison


def _fmt(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def _run_rows(c: Comparison) -> list[tuple[str, ...]]:
    shown = [m for m in SHOWN_METRICS if f"final_{m}" in c.runs]
    head = ("run", "snapshots", f"last {c.x}", *shown, "mean S", "stable share", "delay", "beta")
    rows = [head]
    for r in c.runs.to_dict("records"):
        metrics = [_fmt(r[f"final_{m}"], ".1%" if m == "trainable_share" else ".4f") for m in shown]
        rows.append(
            (
                r["run"],
                str(r["snapshots"]),
                _fmt(r["last_epoch"] if c.x == "epoch" else math.nan, "g"),
                *metrics,
                _fmt(r["final_mean_S"], ".4f"),
                _fmt(r["final_stable_share"], ".0%"),
                _fmt(r["delay_epoch"], "g"),
                _fmt(r["beta"], "g"),
            )
        )
    return rows


def _layer_rows(c: Comparison) -> list[tuple[str, ...]]:
    labels = c.labels
    partial = (c.layers["in_runs"] != "all").any()
    head = ("layer", "shape", *(f"S {lb}" for lb in labels), *(f"Δ {lb}" for lb in labels[1:]))
    rows = [(*head, "in runs") if partial else head]
    for r in c.layers.to_dict("records"):
        cells = (
            r["layer"],
            f"{r['m']}x{r['n']}",
            *(_fmt(r[f"final_S[{lb}]"], ".4f") for lb in labels),
            *(_fmt(r[f"diff[{lb}]"], "+.4f") for lb in labels[1:]),
        )
        rows.append((*cells, r["in_runs"]) if partial else cells)
    return rows


def comparison_lines(c: Comparison) -> list[str]:
    """The printed comparison: the runs, their final values, then final S per layer."""
    lines = [f"{len(c.paths)} runs: " + ", ".join(f"{lb} = {p}" for lb, p in c.paths.items())]
    lines += aligned(_run_rows(c))
    if len(c.layers):
        lines += ["", f"final S per layer (Δ: minus {c.labels[0]})"]
        lines += aligned(_layer_rows(c))
    lines += [f"note: {n}" for n in c.notes]
    return lines
