"""Write a :class:`Report` to a folder: tidy tables (CSV, and Parquet when pyarrow is installed),
plots (PNG and SVG) and ``plan.json``.

The folder may hold other things, but never loses them: every file written is listed, with its
sha256, in ``.bstab-analysis.json``, and a file with one of the output names is replaced only when
that manifest says it is ours and unchanged since (or with ``force``). A folder that cannot be
written is one clear error naming it.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, RunFileError, expected
from .report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TABLES = ("summary", "stability", "spectra", "ranks", "network", "beta_curve")
PLOTS = (
    "stability_heatmap",
    "mean_stability",
    "spectra_grid",
    "spectrum_largest_layer",
    "stable_rank",
    "beta_curve",
)
MANIFEST = ".bstab-analysis.json"
_FORMAT = "basis_stability.analysis-output"
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _parquet() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def output_names(plots: bool = True, formats: tuple[str, ...] = ("png", "svg")) -> list[str]:
    """Every file name an analysis may write into its folder (plan.json whether or not a plan
    comes out: the check runs before the analysis)."""
    tables = ("csv", "parquet") if _parquet() else ("csv",)
    names = [f"{t}.{ext}" for t in TABLES for ext in tables] + ["plan.json"]
    return names + ([f"{p}.{ext}" for p in PLOTS for ext in formats] if plots else [])


def check_dir(
    out_dir: str | Path,
    plots: bool = True,
    formats: tuple[str, ...] = ("png", "svg"),
    force: bool = False,
) -> Path:
    """Fail early and clearly, creating nothing, when ``out_dir`` is a file, cannot be written,
    or holds files with output names that are not our own earlier outputs (unless ``force``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"Expected `out_dir` to be a directory but {out} is a file. Pass a "
            "folder path (it is created if missing).",
            argument="out_dir",
        )
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            expected(
                "out_dir",
                "a folder this process can write",
                str(out),
                f"{existing} is read-only or not writable; choose another `out_dir`.",
            )
        )
    if not force:
        _refuse_foreign(out, output_names(plots, formats))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(out: Path) -> dict[str, str | None] | None:
    """The files the manifest lists as ours (a None hash: being written); None when the manifest
    exists but is not ours; {} when there is none."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        files = data["files"] if data.get("format") == _FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def _ours(out: Path) -> dict[str, str | None]:
    """The manifest's files still as we wrote them (or left half-written by a failed write)."""
    listed = _manifest(out) or {}
    return {
        name: digest
        for name, digest in listed.items()
        if (out / name).is_file() and (digest is None or _sha256(out / name) == digest)
    }


def _refuse_foreign(out: Path, names: list[str]) -> None:
    if not out.is_dir():
        return
    ours = _ours(out)
    clash = [n for n in names if (out / n).exists() and n not in ours]
    if (out / MANIFEST).exists() and _manifest(out) is None:
        clash.append(MANIFEST)
    if clash:
        shown = ", ".join(clash[:8]) + (f", ... ({len(clash)} in all)" if len(clash) > 8 else "")
        raise ConfigError(
            expected(
                "out_dir",
                "a folder without files of its own named like the analysis outputs",
                str(out),
                f"It holds {shown}, not written by an analysis (or changed since). Nothing "
                "was written; pass `force=True` to overwrite them, or choose another `out_dir`.",
            ),
            argument="force",
        )


def _write_manifest(out: Path, files: dict[str, str | None]) -> None:
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": _FORMAT, "version": 1, "files": files}, indent=1))
    os.replace(tmp, out / MANIFEST)


def write_tables(report: Report, out: Path) -> list[Path]:
    parquet = _parquet()
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


def figures(report: Report) -> Iterator[tuple[str, Figure]]:
    """The standard figures of a report, each with its name in :data:`PLOTS`, in that order
    (the stability ones need two snapshots; layers without a finite value, NaN/Inf weights
    throughout, are left out of the spectrum figures). The caller saves and closes each one;
    without an interactive session matplotlib draws off-screen (Agg)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "svg", "pdf") and not _interactive():
        matplotlib.use("Agg")

    from .. import plots

    plan = report.plan
    if len(report.stability):
        tau = plan.rules["delay"]["tau"] if plan else None
        ax = plots.stability_heatmap(report.stability, pair="lag", tau=tau)
        yield "stability_heatmap", ax.figure
        delay = plan.delay_epoch if plan else None
        yield "mean_stability", plots.mean_stability(report.network, delay, tau).figure
    if len(report.spectra):
        yield "spectra_grid", plots.spectra_grid(report.spectra)
        drawn = report.summary[report.summary["layer"].isin(report.spectra["layer"])]
        biggest = drawn.sort_values("params").iloc[-1]["layer"]
        yield "spectrum_largest_layer", plots.spectrum(report.spectra, biggest).figure
    if len(report.ranks):
        yield "stable_rank", plots.rank_trajectories(report.ranks).figure
    if plan is not None and len(report.beta_curve):
        yield "beta_curve", plots.beta_curve(report.beta_curve, beta=plan.beta).figure


def write_plots(report: Report, out: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """The standard :func:`figures` of a report, each saved in every format of ``formats``."""
    import matplotlib.pyplot as plt

    from .. import plots

    paths = []
    try:
        for stem, fig in figures(report):
            paths.extend(plots.save_figure(fig, out / stem, formats))
    finally:
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
    force: bool = False,
) -> list[Path]:
    """Write tables, plots and ``plan.json`` into ``out_dir``; returns the paths written.

    Raises:
        ConfigError: ``out_dir`` is a file, is not writable, or holds files with output names
            that this package did not write there (pass ``force=True`` to overwrite them).
        RunFileError: a write failed otherwise, e.g. the disk is full.
    """
    out = check_dir(out_dir, plots, formats, force)
    return _guarded(out, lambda: _write_all(report, out, plots, formats))


def _write_all(report: Report, out: Path, plots: bool, formats: tuple[str, ...]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # names first, hashes after: outputs a failed write leaves behind are still known as ours
    files = {**_ours(out), **dict.fromkeys(output_names(plots, formats))}
    _write_manifest(out, files)
    paths = write_tables(report, out)
    if report.plan is not None:
        paths.append(report.plan.to_json(out / "plan.json"))
    if plots:
        paths += write_plots(report, out, formats)
    written = {p.name: _sha256(p) for p in paths}
    files = {n: d for n, d in files.items() if d is not None and (out / n).is_file()}
    _write_manifest(out, {**files, **written})
    return paths


def _guarded(out: Path, write: Callable[[], list[Path]]) -> list[Path]:
    """``write()``, with an OSError turned into one line naming the folder and the fix."""
    try:
        return write()
    except OSError as exc:
        where = exc.filename or out
        cause = exc.strerror or str(exc)
        if exc.errno in _UNWRITABLE:
            raise ConfigError(
                expected(
                    "out_dir",
                    "a folder this process can write",
                    str(out),
                    f"Writing {where} failed: {cause}. Choose another `out_dir` or make it "
                    "writable.",
                )
            ) from None
        raise RunFileError(
            f"Could not write the analysis to {out}: writing {where} failed ({cause}). "
            "Free space (or fix the disk) and re-run, or choose another `out_dir`.",
            argument="out_dir",
        ) from None
