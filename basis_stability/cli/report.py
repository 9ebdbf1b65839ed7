"""``bstab report``: one self-contained HTML file of a run's analysis and plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._errors import clean_errors
from ._options import analysis_configs, analysis_options, check_output, show_progress


@click.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="The HTML file to write. Default: RUN-report.html beside RUN.",
)
@analysis_options
@click.option("--force", is_flag=True, help="Overwrite an existing --output.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (shown only on a terminal).")
@clean_errors
def report(run_path: Path, output: Path | None, **opts: Any) -> None:
    """Write one HTML file that shows a run's analysis: its metadata, the OIALR plan (delay,
    beta, ranks, expected trainable share) and why, the per-layer and network tables, the
    figures of `bstab analyze` and every note (layers whose S is undefined, skipped layers).

    The file holds everything itself (figures as inline PNG, no script, no external style or
    font): it opens offline and can be mailed. A run still being recorded is reported as far
    as it goes, and the page says so. An existing output is never overwritten without --force.
    The analysis options are bstab analyze's: give the same ones and the report shows the same
    numbers and plan.

    \b
    Examples:
      bstab report runs/cnn-digits-seed0.h5
      bstab report runs/vit.h5 -o vit.html --force
      bstab report runs/uneven.h5 --lag 5ep --tau 0.98
    """
    from ..reporting.page import default_output, html_report
    from ..store.summary import human_size

    out = output or default_output(run_path)
    if not out.is_dir():  # a folder: html_report's own message (name an .html file in it)
        check_output(out)  # an unwritable folder fails before the analysis, not after
    config, engine, plan = analysis_configs(opts)
    written = html_report(
        run_path,
        out,
        force=opts["force"],
        progress=show_progress(opts["no_progress"]),
        config=config,
        engine=engine,
        plan=plan,
    )
    if written is not None:
        click.echo(
            f"Wrote {written} ({human_size(written.stat().st_size)}): one self-contained HTML "
            "file; open it in any browser, offline."
        )
