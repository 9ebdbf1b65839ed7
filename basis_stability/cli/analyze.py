"""``bstab analyze``: stability, overlap, spectra and the OIALR plan of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, expected
from ._errors import clean_errors, render
from ._options import analysis_configs, analysis_options, show_progress


@click.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for tables, plots and plan.json. Default: RUN-analysis/ beside RUN.",
)
@analysis_options
@click.option("--no-plots", is_flag=True, help="Tables and plan.json only.")
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite files in -o named like the outputs that bstab analyze did not write.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep re-analysing as new snapshots arrive until the writer stops.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="--follow: seconds between checks for new snapshots.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="--follow: stop after this many seconds without a new snapshot.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars (shown only on a terminal).")
@clean_errors
def analyze(run_path: Path, **opts: Any) -> None:
    """Measure basis stability, top-k overlap, spectra and ranks of a run; recommend OIALR's
    delay and beta.

    Prints a per-layer table and a network summary; writes CSV tables (and Parquet when pyarrow
    is installed), PNG and SVG plots, and plan.json (read by `bstab train --plan`). SVDs are
    cached beside the run (RUN.bstab-cache-*.h5), so re-running only pays for new snapshots; the
    run itself is never modified. Works on a run that is still being recorded. Files in -o
    that bstab analyze did not write (listed in -o/.bstab-analysis.json) are never overwritten
    without --force.

    \b
    Examples:
      bstab analyze runs/cnn-digits-seed0.h5
      bstab analyze runs/vit.h5 -o out/ --lag 10 --jobs 2
      bstab analyze runs/uneven.h5 --lag 5ep
      bstab analyze runs/live.h5 --follow
      torchrun --nproc_per_node=2 -m basis_stability analyze runs/vit.h5

    Under torchrun the SVDs are shared out across the ranks (each may use its own GPU with
    --device cuda); rank 0 gathers them and writes exactly what one process would.
    """
    from .. import api
    from ..analysis.follow import follow_analysis

    _setup_torchrun(opts["follow"], opts["jobs"])
    config, engine, plan = analysis_configs(opts)
    out = opts["output"] or run_path.with_name(run_path.stem + "-analysis")

    def analyze_once():
        return api.analyze(
            run_path, config, engine, plan, progress=show_progress(opts["no_progress"])
        )

    for text in follow_analysis(
        run_path,
        out,
        analyze_once,
        plots=not opts["no_plots"],
        follow=opts["follow"],
        poll=opts["poll"],
        idle_timeout=opts["idle_timeout"],
        force=opts["force"],
    ):
        click.echo(render(text, "analyze"))  # the report's notes name Python arguments


def _setup_torchrun(follow: bool, jobs: int) -> None:
    """Under torchrun: one process group, no --follow, and the ranks as the workers."""
    from ..analysis import distributed

    if not distributed.launched_by_torchrun():
        return
    if follow:
        raise ConfigError(
            "Expected `--follow` without torchrun but got both. Follow a live run with one "
            "process; shard a finished run's SVDs over ranks with torchrun."
        )
    if jobs > 1:
        raise ConfigError(
            expected("--jobs", "1 under torchrun", jobs, "The ranks are the workers.")
        )
    distributed.init_from_env()
