"""One self-contained HTML file for a run: ``html_report(run)`` (``bstab report``).

The page carries everything in itself: the figures as base64 PNG ``data:`` URIs, the style in
one ``<style>`` element, no script, no font, nothing fetched; so it opens offline and can be
mailed. It holds the run's metadata, the plan with its evidence, the per-layer summary, the
network table, the figures of ``bstab analyze`` and every note.

Example:
    >>> from basis_stability.reporting import html_report
    >>> html_report("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
    PosixPath('runs/cnn-digits-seed0-report.html')
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BstabError, ConfigError, Message, RunFileError, Shown, expected
from ..store.paths import as_path, refuse_existing, write_atomically
from . import sections as sec
from .runinfo import RunInfo, read_run_info

if TYPE_CHECKING:
    from ..analysis.config import EngineConfig
    from ..analysis.report import AnalysisConfig, Report
    from ..recommend.plan import PlanConfig

CAPTIONS = {
    "stability_heatmap": "Lag-pair stability S per layer and snapshot (bright: a settled basis).",
    "mean_stability": "Mean and parameter-weighted S over the network, with the stable share "
    "and the plan's delay.",
    "spectra_grid": "Singular value spectra of every layer, coloured by epoch.",
    "spectrum_largest_layer": "The spectrum of the largest layer over training.",
    "stable_rank": "Stable rank of each layer over training.",
    "beta_curve": "Trainable share and kept energy against the cut-off beta, at the plan's beta.",
}
FIGURE_DPI = 110
_OVERWRITE = Message("Pass `force=True` to overwrite it, or choose another `out`", ["force"])

CSS = """
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1160px; padding: 24px 28px 60px; color: #1d2330;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px;
  border-bottom: 2px solid #d9dee7; }
h3 { font-size: 16px; margin: 20px 0 6px; }
a { color: #2b5fad; }
.sub { color: #5b6474; margin: 0 0 16px; word-break: break-all; }
nav.toc { background: #f2f4f8; border: 1px solid #d9dee7; border-radius: 6px;
  padding: 8px 18px; display: inline-block; min-width: 260px; }
nav.toc ol { margin: 4px 0; padding-left: 20px; }
.banner { border-left: 5px solid #e0b000; background: #fff4d6; padding: 8px 14px;
  margin: 8px 0; border-radius: 3px; }
.banner.error { border-color: #c62828; background: #fde4e4; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; }
table.data th, table.data td { border: 1px solid #d9dee7; padding: 3px 8px;
  text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.data { font-size: 14px; }
table.data th { background: #f2f4f8; white-space: normal; vertical-align: bottom; }
table.data td:first-child, table.data th:first-child { text-align: left; }
table.data td:first-child { font-weight: 600; white-space: normal; }
table.data td:last-child, table.data th:last-child { text-align: left; }
table.data td:last-child { white-space: normal; min-width: 12em; }
table.data tbody tr:nth-child(even) { background: #fafbfd; }
table.data tbody tr.nan { background: #fff1f0; }
table.data tbody tr.delay { background: #e3eefc; font-weight: 600; }
table.kv th { text-align: left; padding: 3px 18px 3px 0; color: #5b6474; font-weight: 600;
  vertical-align: top; white-space: nowrap; }
table.kv td { padding: 3px 0; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin: 6px 0 14px; }
.card { border: 1px solid #d9dee7; border-radius: 8px; padding: 10px 18px; min-width: 170px; }
.card .label { color: #5b6474; font-size: 13px; text-transform: uppercase; }
.card .value { font-size: 24px; font-weight: 700; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d9dee7; }
figcaption { color: #5b6474; font-size: 14px; }
pre { background: #f2f4f8; border: 1px solid #d9dee7; padding: 10px; overflow-x: auto;
  font-size: 13px; }
footer { margin-top: 40px; color: #5b6474; font-size: 13px; }
@media print { nav.toc { display: none; } figure { break-inside: avoid; }
  .scroll { overflow: visible; } table.data { font-size: 11px; } }
"""


def figure_images(report: Report, progress: bool = False) -> Iterator[tuple[str, str]]:
    """``(name, data URI)`` of each standard figure of ``report`` (:func:`~.output.figures`), as
    a base64 PNG."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from ..analysis.output import figures

    try:
        for name, fig in tqdm(figures(report), desc="figures", unit="figure", disable=not progress):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
            plt.close(fig)
            yield name, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    finally:
        plt.close("all")


def _figures_html(images: list[tuple[str, str]]) -> str:
    if not images:
        return "<p>No figures: the run has no snapshot with a finite spectrum.</p>"
    return "".join(
        f'<figure id="fig-{sec.esc(name)}"><img src="{uri}" alt="{sec.esc(name)}">'
        f"<figcaption>{sec.esc(CAPTIONS.get(name, name))}</figcaption></figure>"
        for name, uri in images
    )


def render_html(report: Report, info: RunInfo | None, images: list[tuple[str, str]]) -> str:
    """The whole page: ``report``'s tables and plan, ``info`` (the run's metadata; None when
    the run file cannot be read any more) and ``images`` (:func:`figure_images`)."""
    from .. import __version__

    meta = sec.key_values(info.rows) if info is not None else "<p>The run file cannot be read.</p>"
    parts = [
        ("run", "Run", meta),
        ("plan", "Plan", sec.plan_section(report)),
        ("summary", "Layers", sec.summary_section(report)),
        ("network", "Network", sec.network_section(report)),
        ("figures", "Figures", _figures_html(images)),
        ("notes", "Notes", sec.notes_section(report, info)),
    ]
    if info is not None and info.inspect:
        parts.append(("inspect", "bstab inspect", f"<pre>{sec.esc(info.inspect)}</pre>"))
    toc = "".join(f'<li><a href="#{key}">{sec.esc(title)}</a></li>' for key, title, _ in parts)
    body = "".join(
        f'<section id="{key}"><h2>{sec.esc(title)}</h2>{content}</section>'
        for key, title, content in parts
    )
    flags = "".join(
        f'<div class="banner {level}">{sec.esc(text)}</div>'
        for level, text in sec.banners(report, info)
    )
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    name = sec.esc(Path(report.run_path).name)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Basis stability report: {name}</title><style>{CSS}</style></head><body>"
        f'<header><h1>Basis stability report</h1><p class="sub">{sec.esc(report.run_path)}'
        f" · {report.n_snapshots} snapshots · {len(report.summary)} layers</p></header>"
        f'{flags}<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>{body}'
        f"<footer>Written {now} by basis_stability {sec.esc(__version__)} "
        "(<code>bstab report</code>); self-contained, opens offline.</footer></body></html>\n"
    )


def default_output(run_path: str | os.PathLike) -> Path:
    """``RUN-report.html`` beside the run."""
    path = Path(run_path)
    return path.with_name(path.stem + "-report.html")


def html_report(
    run: Report | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    config: AnalysisConfig | None = None,
    engine: EngineConfig | None = None,
    plan: PlanConfig | None = None,
) -> Path | None:
    """Write one self-contained HTML report of a run: metadata, plan, tables, figures, notes.

    Args:
        run: a run file (analysed here, also one still being recorded) or the
            :class:`~basis_stability.analysis.Report` of ``bs.analyze``.
        out: the HTML file; default ``RUN-report.html`` beside the run.
        force: replace an existing ``out``; without it an existing file is refused before any
            work, and left as it was.
        progress: progress bars over the decompositions and the figures.
        config, engine, plan: :func:`basis_stability.analyze`'s, for a run file.

    Returns:
        The path written (None on a rank other than 0 under torch.distributed).

    Raises:
        RunExistsError: ``out`` exists and ``force`` is false.
        RunFileError: the run is missing, not a run or damaged (DamagedRunError), or ``out``
            cannot be written.

    Example:
        >>> html_report("runs/cnn-digits-seed0.h5", force=True)  # doctest: +SKIP
        PosixPath('runs/cnn-digits-seed0-report.html')
    """
    from ..analysis.report import Report

    report = run if isinstance(run, Report) else None
    if report is not None and (config, engine, plan) != (None, None, None):
        raise ConfigError(
            expected(
                "run",
                "a run file when `config`, `engine` or `plan` is given",
                Shown("an analysed Report"),
                "Pass the run's path, or drop them: a Report is shown as it was analysed.",
            )
        )
    run_path = report.run_path if report is not None else as_path(run, "run")
    target = _check_out(out if out is not None else default_output(run_path), force)
    info = _run_info(run_path, must=report is None)
    if report is None:
        from .. import api

        report = api.analyze(run_path, config, engine, plan, progress=progress)
        if report is None:  # a rank other than 0: rank 0 writes the page
            return None
    page = render_html(report, info, list(figure_images(report, progress)))
    return _write(target, page, force)


def _check_out(out: str | os.PathLike, force: bool) -> Path:
    target = as_path(out, "out")
    if target.is_dir():
        raise ConfigError(
            expected("out", "a file, not a folder", str(target), "Name an .html file in it.")
        )
    if not force:
        refuse_existing(target, "out", _OVERWRITE)
    return target


def _run_info(path: Path, must: bool) -> RunInfo | None:
    """The run's metadata; for a report passed in, None when its run file is gone or damaged."""
    try:
        return read_run_info(path)
    except BstabError:
        if must:
            raise
        return None


def _save(tmp: Path, page: str) -> None:
    tmp.write_text(page, encoding="utf-8")


def _write(target: Path, page: str, force: bool) -> Path:
    try:
        return write_atomically(target, lambda tmp: _save(tmp, page), force=force, argument="out")
    except OSError as exc:
        if isinstance(exc, RunFileError):
            raise
        raise RunFileError(
            f"Cannot write the report to `out` {target} ({exc.strerror or exc}). Choose a "
            "writable path.",
            argument="out",
        ) from None
