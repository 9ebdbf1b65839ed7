"""Write a :class:`Report` to a folder: tidy tables (CSV, and Parquet when pyarrow is installed),
plots (PNG and SVG) and ``plan.json``."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..errors import ConfigError
from .report import Report

log = logging.getLogger(__name__)

TABLES = ("summary", "stability", "spectra", "ranks", "network", "beta_curve")


def check_dir(out_dir: str | Path) -> Path:
    """A clear error when ``out_dir`` is a file; creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"Expected `--output` to be a directory but {out} is a file. Pass a "
            "folder path (it is created if missing)."
        )
    return out


def prepare_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents); a clear error when it is a file."""
    out = check_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_tables(report: Report, out: Path) -> list[Path]:
    parquet = importlib.util.find_spec("pyarrow") is not None
    if not parquet:
        log.warning(
            "pyarrow is not installed: tables written as CSV only. "
            "Install it for Parquet too: pip install 'basis_stability[parquet]'"
        )
    paths = []
    for name in TABLES:
        frame = getattr(report, name)
        paths.append(out / f"{name}.csv")
        frame.to_csv(paths[-1], index=False)
        if parquet:
            paths.append(out / f"{name}.parquet")
            frame.to_parquet(paths[-1], index=False)
    return paths


def write_plots(report: Report, out: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """The standard figures of a report (needs two snapshots for the stability ones)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "svg", "pdf") and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import plots

    plan, paths = report.plan, []

    def save(fig, stem):
        paths.extend(plots.save_figure(fig, out / stem, formats))

    if len(report.stability):
        ax = plots.stability_heatmap(report.stability, pair="lag")
        save(ax.figure, "stability_heatmap")
        delay = plan.delay_epoch if plan else None
        ax = plots.mean_stability(
            report.network, delay_epoch=delay, tau=plan.rules["delay"]["tau"] if plan else None
        )
        save(ax.figure, "mean_stability")
    if len(report.spectra):
        save(plots.spectra_grid(report.spectra), "spectra_grid")
        biggest = report.summary.sort_values("params").iloc[-1]["layer"]
        save(plots.spectrum(report.spectra, biggest).figure, "spectrum_largest_layer")
        save(plots.rank_trajectories(report.ranks).figure, "stable_rank")
    if plan is not None and len(report.beta_curve):
        save(plots.beta_curve(report.beta_curve, beta=plan.beta).figure, "beta_curve")
    plt.close("all")
    return paths


def _interactive() -> bool:
    import sys

    return "ipykernel" in sys.modules


def write_report(
    report: Report,
    out_dir: str | Path,
    plots: bool = True,
    formats: tuple[str, ...] = ("png", "svg"),
) -> list[Path]:
    """Write tables, plots and ``plan.json`` into ``out_dir``; returns the paths written."""
    out = prepare_dir(out_dir)
    paths = write_tables(report, out)
    if report.plan is not None:
        paths.append(report.plan.to_json(out / "plan.json"))
    if plots:
        paths += write_plots(report, out, formats)
    return paths
