"""``bstab analyze``: stability, overlap, spectra and the OIALR plan of a run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError, expected
from ._errors import clean_errors, render
from ._options import parse_lag, show_progress

if TYPE_CHECKING:
    pass


@click.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for tables, plots and plan.json. Default: RUN-analysis/ beside RUN.",
)
@click.option(
    "--lag",
    metavar="LAG",
    default="5",
    callback=parse_lag,
    show_default=True,
    help="How far apart the lag pairs of the delay rule are: N snapshots, or a time, 5ep "
    "(epochs) or 200steps, pairing each snapshot with the one nearest that long before it.",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Top-k of the singular-subspace overlap O_k.",
)
@click.option(
    "--tau",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.99,
    show_default=True,
    help="A layer is stable when S >= tau.",
)
@click.option(
    "--share",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.9,
    show_default=True,
    help="Parameter share of stable layers the delay needs.",
)
@click.option(
    "--beta-rule",
    type=click.Choice(["energy", "share"]),
    default="energy",
    show_default=True,
    help="Pick beta by kept energy or by a trainable-share target.",
)
@click.option(
    "--min-energy",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.9,
    show_default=True,
    help="energy rule: spectral energy every layer must keep.",
)
@click.option(
    "--target-share",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.25,
    show_default=True,
    help="share rule: trainable share of the recorded layers.",
)
@click.option(
    "--svd",
    type=click.Choice(["exact", "approx"]),
    default="exact",
    show_default=True,
    help="approx: randomised top-k (no S, fast on big layers).",
)
@click.option(
    "--method",
    type=click.Choice(["gram", "svd"]),
    default="gram",
    show_default=True,
    help="exact mode: float64 Gram eigendecomposition (SVD above cond 1e4), or an SVD each.",
)
@click.option(
    "--svd-dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="precision of the cached vectors (and of --method svd).",
)
@click.option(
    "--chunk-mb",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="memory one batched decomposition of a layer's snapshots may take.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes over layers.",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write the SVD sidecar cache.")
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
    config, engine, plan = _configs(opts)
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


def _configs(opts: dict[str, Any]):
    """The analysis, engine and plan configs the options describe."""
    from ..analysis import AnalysisConfig, EngineConfig
    from ..recommend import PlanConfig

    engine = ("svd", "method", "svd_dtype", "chunk_mb", "device", "jobs")
    plan = ("tau", "share", "beta_rule", "min_energy", "target_share")
    return (
        AnalysisConfig(lag=opts["lag"], k=opts["k"]),
        EngineConfig(**{n: opts[n] for n in engine}, cache=not opts["no_cache"]),
        PlanConfig(**{n: opts[n] for n in plan}),
    )
