"""Write a :class:`~.compare.Comparison` to a folder: its tables as CSV, its figures as PNG/SVG.

An existing file with one of the output names is never replaced without ``force``: every name is
checked before anything is written (:func:`~basis_stability.store.paths.refuse_existing`), so a
refusal leaves the folder exactly as it was, and each file is written through a temporary file
beside it (:func:`~basis_stability.store.paths.write_atomically`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, Message, RunFileError, expected
from ..store.paths import refuse_existing, write_atomically
from .compare import SHOWN_METRICS, Comparison

TABLES = ("runs", "layers", "layer_ranks", "network", "metrics")
PLOTS = ("mean_stability", "final_S", "ranks", "metrics")
FORMATS = ("png", "svg")
_FIX = Message("Pass `force=True` to overwrite it, or choose another `out_dir`", ["force"])


def output_names(formats: tuple[str, ...] = FORMATS) -> list[str]:
    """Every file name a comparison may write into its folder."""
    return [f"{t}.csv" for t in TABLES] + [f"{p}.{ext}" for p in PLOTS for ext in formats]


def check_out_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Fail before any work, creating nothing, when ``out_dir`` is a file or (without
    ``force``) already holds a file named like an output."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            expected(
                "out_dir", "a folder", str(out), "It is a file; name a folder (created if missing)."
            ),
        )
    if not force:
        for name in output_names():
            refuse_existing(out / name, "out_dir", _FIX)
    return out


def write_comparison(
    comparison: Comparison, out_dir: str | Path, force: bool = False
) -> list[Path]:
    """Write the tables and figures of ``comparison`` into ``out_dir``; returns the paths.

    Raises:
        RunExistsError: a file named like an output exists and ``force`` is false; nothing
            was written.
        RunFileError: a write failed (no space, no permission), naming the folder.
    """
    out = check_out_dir(out_dir, force)
    try:
        paths = [
            _write_table(getattr(comparison, name), out / f"{name}.csv", force) for name in TABLES
        ]
        return paths + _write_figures(comparison, out, force)
    except OSError as exc:
        if isinstance(exc, RunFileError):
            raise
        raise RunFileError(
            f"Could not write the comparison to {out}: {exc.strerror or exc} "
            f"({exc.filename or out}). Free space or choose another `out_dir`.",
            argument="out_dir",
        ) from None


def _write_table(frame: pd.DataFrame, path: Path, force: bool) -> Path:
    return _write(path, lambda tmp: frame.to_csv(tmp, index=False), force)


def _write(path: Path, write: Callable[[Path], object], force: bool) -> Path:
    return write_atomically(path, write, force=force, argument="out_dir")


def _write_figures(comparison: Comparison, out: Path, force: bool) -> list[Path]:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "svg", "pdf") and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    try:
        for stem, fig in draw_figures(comparison).items():
            for ext in FORMATS:
                save = lambda tmp, fig=fig, ext=ext: fig.savefig(tmp, format=ext, dpi=120)  # noqa: E731
                paths.append(_write(out / f"{stem}.{ext}", save, force))
    finally:
        plt.close("all")
    return paths


def _interactive() -> bool:
    return "ipykernel" in sys.modules


def draw_figures(comparison: Comparison) -> dict:
    """The comparison's figures by file stem (those its data can draw): mean stability over
    epochs, final S per layer, the three ranks per layer, and the shown metrics over epochs."""
    import matplotlib.pyplot as plt

    from .. import plots_compare as pc

    c, figs, runs = comparison, {}, comparison.labels
    if len(c.network):
        figs["mean_stability"] = pc.stability_over_epochs(c.network, x=c.x, runs=runs).figure
    if c.layer_ranks["final_S"].notna().any():
        figs["final_S"] = pc.final_stability(c.layer_ranks, runs=runs).figure
    if len(c.layer_ranks):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
        for ax, rank in zip(axes, ("stable_rank", "effective_rank", "energy_rank")):
            pc.ranks_by_layer(c.layer_ranks, rank=rank, runs=runs, ax=ax)
        _one_legend(axes)
        figs["ranks"] = fig
    shown = [m for m in SHOWN_METRICS if (c.metrics["metric"] == m).any()]
    if shown:
        fig, axes = plt.subplots(
            1, len(shown), figsize=(4.8 * len(shown), 3.8), squeeze=False, layout="constrained"
        )
        for ax, metric in zip(axes[0], shown):
            pc.metric_over_epochs(c.metrics, metric=metric, x=c.x, runs=runs, ax=ax)
        _one_legend(axes[0])
        figs["metrics"] = fig
    return figs


def _one_legend(axes) -> None:
    """Panels side by side share their colours: the last keeps its legend (at its right)."""
    for ax in list(axes)[:-1]:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
