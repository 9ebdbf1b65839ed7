"""``bstab compare``: two or more runs side by side (seeds, full rank against OIALR, lrs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._errors import clean_errors, render
from ._options import analysis_configs, analysis_options, show_progress


@click.command()
@click.argument("run_paths", metavar="RUN.h5 RUN.h5...", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for the tables and plots. Default: compare-A-vs-B/ beside the first run.",
)
@analysis_options
@click.option("--force", is_flag=True, help="Overwrite output files that already exist.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (shown only on a terminal).")
@clean_errors
def compare(run_paths: tuple[Path, ...], output: Path | None, **opts: Any) -> None:
    """Overlay two or more runs: mean stability over epochs, final S, ranks and metrics
    (val_acc, val_loss, trainable share) per run, and a table of their differences to the
    first run.

    Prints a per-run and a per-layer table; writes CSV tables (runs, layers, layer_ranks,
    network, metrics) and PNG/SVG figures into -o. Runs are labelled by their file names
    without the parts all of them share, aligned by epoch (runs of different lengths overlay),
    and compared on the layers they have in common (the others are listed). A file given twice
    is compared once. Existing output files are never replaced without --force. Each run is
    analysed as bstab analyze does, with the same analysis options (one set for every run) and
    its SVDs cached beside it.

    \b
    Examples:
      bstab compare runs/cnn-digits-seed0.h5 runs/cnn-digits-seed1.h5
      bstab compare runs/full.h5 runs/oialr.h5 -o out/full-vs-oialr --force
    """
    from .. import api
    from ..analysis.compare import check_paths, default_out_dir, short_labels

    if len({p.resolve() for p in run_paths}) < 2:
        given = " ".join(str(p) for p in run_paths) or "none"
        twice = " (the same file given twice counts once)" if len(run_paths) > 1 else ""
        raise click.UsageError(
            f"Expected two or more different run files (RUN.h5 RUN.h5 ...) but got "
            f"{given}{twice}. Name every run to compare, e.g. bstab compare runs/full.h5 "
            "runs/oialr.h5."
        )
    runs, _ = check_paths(list(run_paths))  # a missing file, or the same file twice
    out = output or default_out_dir(runs, short_labels(runs))
    config, engine, plan = analysis_configs(opts)
    comparison = api.compare(
        list(run_paths),
        out,
        config=config,
        engine=engine,
        plan=plan,
        force=opts["force"],
        progress=show_progress(opts["no_progress"]),
    )
    click.echo(render(comparison.text(), "compare"))
    click.echo(f"Tables and figures in {out}/")
