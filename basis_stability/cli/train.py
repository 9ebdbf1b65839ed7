"""``bstab train``: OIALR (or full-rank) training of a built-in model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._errors import clean_errors, render
from ._options import check_output, show_progress, training_config, training_options


@click.command()
@click.option("--mode", type=click.Choice(["oialr", "full"]), default="oialr", show_default=True)
@training_options
@click.option("--delay", default=None, help="Full-rank epochs (10) or steps (250steps).")
@click.option("--interval", default=None, help="Epochs or steps between updates (default 5).")
@click.option("--beta", type=float, default=None, help="Cut-off in (0, 1), e.g. 0.15.")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Take delay, interval and beta from a plan.json of `bstab analyze`.",
)
@click.option(
    "--auto/--no-auto",
    default=None,
    help="Pick delay and beta from stability measured while training (the default "
    "when neither --delay, --beta nor --plan is given). --no-auto needs one of them.",
)
@click.option(
    "--target-share",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    metavar="SHARE",
    help="Auto mode: pick beta by the share rule, the smallest beta whose expected trainable "
    "share of the factorised layers (those kept dense counted whole) is <= SHARE, e.g. 0.2 "
    "(default: the energy rule, 90% spectral energy kept in every layer).",
)
@click.option(
    "--preset",
    type=click.Choice(["bstab", "reference"]),
    default="bstab",
    show_default=True,
    help="bstab: our rules. reference: the authors' code rank for rank (first cut at "
    "conversion, progressive updates, its rounding and eligibility; no --auto; without "
    "--delay/--beta: delay = training/6, beta 0.15). See docs/oialr.md.",
)
@click.option(
    "--keep-first/--no-keep-first",
    default=None,
    help="Keep the first eligible layer full-rank (default: no).",
)
@click.option(
    "--keep-last/--no-keep-last",
    default=None,
    help="Keep the last eligible layer full-rank (default: no; yes with --preset reference).",
)
@click.option(
    "--moments",
    type=click.Choice(["rotate", "slice", "reset", "restart"]),
    default=None,
    help="Optimizer-state policy at conversion and truncation: reset zeroes the moments and "
    "keeps Adam's step, restart zeroes the step too (default: reset; slice with "
    "--preset reference).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Run file. Default: runs/train-MODE-MODEL-DATASET-seedN.h5.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide progress bars (shown only on a terminal).")
@clean_errors
def train(**opts: Any) -> None:
    """Train a built-in model with OIALR (or full-rank), record it, export the compact model.

    OIALR trains full-rank, then freezes each layer's singular bases and trains only a small
    k x k S, cutting singular values below beta * s_1 every interval. By default (--auto) the
    delay and beta come from the stability and spectra measured while training.

    \b
    Examples:
      bstab train
      bstab train --mode full --model vit-tiny
      bstab train --model forecaster --dataset co2 --epochs 30
      bstab train --delay 7 --interval 5 --beta 0.15
      bstab train --plan runs/cnn-digits-seed0-analysis/plan.json
      bstab train --preset reference --delay 250steps --interval 100steps --beta 0.15
    """
    from .. import jobs

    _check_before_work(opts["delay"], opts["interval"], opts["beta"], opts["plan_path"])
    job = _job(opts)
    if job.mode == "oialr":
        jobs.auto_mode(job)  # --auto/--no-auto against the schedule options, before any work
    output, mode = opts["output"], job.mode
    stem = f"train-{mode}-{job.model}-{job.dataset}-seed{job.train.seed}"
    check_output(output or jobs.default_run_path(stem))  # an existing file: the writer refuses it

    def run(path: Path) -> jobs.TrainResult:
        export = path.with_name(path.stem + "-factorized.pt") if mode == "oialr" else None
        create = "overwrite" if opts["force"] and output else "create"
        return jobs.run_train_job(
            job, path, export, mode=create, progress=show_progress(opts["no_progress"])
        )

    _echo(run(output) if output else jobs.at_free_path(stem, run))


def _check_before_work(
    delay: str | None, interval: str | None, beta: float | None, plan_path: Path | None
) -> None:
    """The schedule options' own checks, before any data is loaded."""
    from .. import jobs
    from ..errors import ConfigError
    from ..recommend import Plan
    from ..recommend.rules import check_beta

    if plan_path is not None and (delay is not None or beta is not None):
        raise click.UsageError("--plan already sets delay and beta; drop --delay/--beta.")
    if beta is not None:
        check_beta(beta)
    for text, name in ((delay, "delay"), (interval, "interval")):
        jobs.parse_steps(text, name, 1)  # its form; in steps once the data is known
    if plan_path is not None:
        try:
            Plan.from_json(plan_path)  # a bad plan fails before any work
        except ConfigError as exc:  # about the file's fields (its `beta`), not this command's
            raise ConfigError(str(exc), argument="plan") from None


def _job(opts: dict[str, Any]):
    """The :class:`~basis_stability.jobs.TrainJob` the options describe."""
    from .. import jobs

    names = ("epochs", "batch_size", "lr", "optimizer", "seed", "warmup", "lr_schedule")
    passed = ("model", "dataset", "mode", "delay", "interval", "beta", "moments", "device")
    passed += ("preset", "keep_first", "keep_last", "auto", "target_share")
    return jobs.TrainJob(
        train=training_config(*(opts[n] for n in names)),
        plan=str(opts["plan_path"]) if opts["plan_path"] else None,
        **{n: opts[n] for n in passed},
    )


def _echo(result) -> None:
    """One summary line, the export comparison, and what the run left dense or unconverted."""
    tail = f", model {result.export_path}" if result.export_path else ""
    click.echo(
        f"{result.summary()} | trainable {result.trainable_share:.1%} of the "
        f"full-rank model ({result.factorised_share:.1%} of the factorised layers) | "
        f"{result.seconds:.1f} s | run {result.run_path}{tail}"
    )
    if result.export is not None:
        click.echo(f"export: {result.export}")
    if result.never_converted is not None:
        click.echo(render(result.never_converted, "train"), err=True)  # names Python arguments
    if result.kept_dense is not None:
        click.echo(render(result.kept_dense, "train"), err=True)
