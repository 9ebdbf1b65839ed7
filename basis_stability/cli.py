"""The ``bstab`` command line. Heavy imports live inside the commands so ``--help`` is instant."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import BstabError, ConfigError, expected


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's errors (and a Ctrl-C) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BstabError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo(
                "\nInterrupted. Every snapshot committed so far is kept in the run file.", err=True
            )
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(
                f"Unexpected {type(exc).__name__}: {exc}. This is a bug in basis_stability; "
                "rerun with `bstab -vv ...` for the traceback and report it."
            ) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="basis_stability")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Record, analyse and exploit how a network's weight bases settle during training."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_MODELS = ["mlp", "cnn", "vit-tiny"]


def _training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by `record` and `train`: model, data and the optimizer recipe."""
    for option in reversed(_TRAINING_OPTIONS):
        fn = option(fn)
    return fn


_TRAINING_OPTIONS = [
    click.option(
        "--model",
        type=click.Choice(_MODELS),
        default="cnn",
        show_default=True,
        help="Built-in model to train.",
    ),
    click.option(
        "--dataset",
        type=click.Choice(["digits", "mnist1d"]),
        default="digits",
        show_default=True,
        help="Offline dataset (digits ships with scikit-learn).",
    ),
    click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option(
        "--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True
    ),
    click.option(
        "--optimizer",
        type=click.Choice(["adamw", "adam", "sgd"]),
        default="adamw",
        show_default=True,
    ),
]


@main.command()
@_training_options
@click.option(
    "--schedule",
    default="epoch",
    show_default=True,
    help="When to snapshot: epoch, every:N (steps), at:S1,S2,... or log:N.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the snapshots.",
)
@click.option("--include", multiple=True, help="Layer name glob (or re:REGEX); repeatable.")
@click.option("--exclude", multiple=True, help="Layer name glob (or re:REGEX) to drop.")
@click.option("--types", multiple=True, help="Layer kinds: linear, conv*, mha, embedding, ...")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Run file. Default: runs/MODEL-DATASET-seedN.h5, never overwriting.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option(
    "--from-checkpoints",
    "checkpoints",
    metavar="GLOB",
    default=None,
    help="Build the run from existing state-dict checkpoints instead of training.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--list",
    "list_only",
    is_flag=True,
    help="Only list the layers that would be recorded and skipped.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_clean_errors
def record(
    model: str,
    dataset: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    schedule: str,
    dtype: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    types: tuple[str, ...],
    output: Path | None,
    force: bool,
    checkpoints: str | None,
    device: str,
    list_only: bool,
    no_progress: bool,
) -> None:
    """Train a built-in model and snapshot its layers into a run file.

    With no options: the cnn on scikit-learn's digits for 40 epochs, a snapshot of the initial
    weights and one after every epoch. With --from-checkpoints 'ckpts/epoch_*.pt' (quote it), the
    snapshots come from existing state dicts (.pt or .safetensors), in natural order.

    \b
    Examples:
      bstab record
      bstab record --model vit-tiny --epochs 60 --schedule every:10 -o runs/vit.h5
      bstab record --from-checkpoints 'ckpts/epoch_*.pt' -o runs/mine.h5
    """
    from .record import RecordConfig

    rec_cfg = RecordConfig(
        include=include or None, exclude=exclude or None, types=types or None, dtype=dtype
    )
    if output is not None and output.exists() and not force and not list_only:
        raise click.ClickException(
            f"{output} already exists. Pass --force to overwrite it or "
            "choose another --output; nothing was written."
        )
    if checkpoints is not None:
        _record_checkpoints(checkpoints, rec_cfg, output, force, list_only, not no_progress)
        return
    from . import jobs
    from .train import TrainConfig

    job = jobs.RecordJob(
        model,
        dataset,
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed),
        rec_cfg,
        schedule,
        device,
    )
    if list_only:
        from .views import select_layers

        net, _ = jobs.build(job)
        _print_selection(select_layers(net, rec_cfg.include, rec_cfg.exclude, rec_cfg.types))
        return
    path = output or jobs.default_run_path(f"{model}-{dataset}-seed{seed}")
    result = jobs.run_record_job(
        job, path, mode="overwrite" if force else "create", progress=not no_progress
    )
    last = result.history[-1]
    click.echo(
        f"Recorded {result.n_snapshots} snapshots of {result.n_layers} layers "
        f"(final val_acc {last['val_acc']:.3f}) to {result.path}"
    )
    click.echo(f"Next: bstab inspect {result.path}")


def _record_checkpoints(
    pattern: str, cfg: Any, output: Path | None, force: bool, list_only: bool, progress: bool
) -> None:
    from .jobs import default_run_path
    from .record import find_checkpoints, record_checkpoints
    from .record.checkpoints import open_checkpoint
    from .store import open_run
    from .views import select_state_dict

    if list_only:
        with open_checkpoint(find_checkpoints(pattern)[0]) as ckpt:
            _print_selection(select_state_dict(ckpt.shapes, cfg.include, cfg.exclude, cfg.types))
        return
    path = output or default_run_path("checkpoints")
    record_checkpoints(pattern, path, cfg, force=force, progress=progress)
    with open_run(path) as run:
        click.echo(f"Recorded {run.n_snapshots} checkpoints of {len(run.layers)} layers to {path}")


def _print_selection(selection: Any) -> None:
    click.echo(f"{len(selection.views)} layers selected:")
    for v in selection.views:
        click.echo(f"  {v.name:40s} {v.kind:10s} {v.shape[0]}x{v.shape[1]}")
    if selection.skipped:
        click.echo(f"{len(selection.skipped)} skipped:")
        click.echo(selection.describe_skipped())


@main.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option("--no-scan", is_flag=True, help="Skip the NaN/Inf scan (reads every snapshot).")
@_clean_errors
def inspect(run_path: Path, no_scan: bool) -> None:
    """Print a readable summary of a run: layers, shapes, snapshots, metrics, size."""
    from .store.summary import summarize

    click.echo(summarize(run_path, scan=not no_scan))


@main.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@_clean_errors
def validate(run_path: Path) -> None:
    """Check a run file against the format spec (checkpoints_spec/) and list findings.

    Exits 1 when any finding is an error.
    """
    from .store.validate import validate_run

    report = validate_run(run_path)
    for finding in report.findings:
        click.echo(str(finding))
    if not report.ok:
        raise click.ClickException(
            f"{run_path} does not conform to the run format "
            f"({sum(f.level == 'error' for f in report.findings)} errors)."
        )
    warnings = sum(f.level == "warning" for f in report.findings)
    click.echo(
        f"OK: {run_path} conforms to the run format ({report.n_snapshots} snapshots"
        f"{f', {warnings} warnings' if warnings else ''})."
    )


@main.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option(
    "-s",
    "--snapshot",
    type=int,
    default=-1,
    show_default=True,
    help="Snapshot index; negative counts from the end (-1 is the last).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "pt"]),
    default=None,
    help="File format. Default: from the --output suffix, else safetensors.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="File to write. Default: RUN-snapshotN.safetensors (or .pt) beside RUN.",
)
@click.option(
    "--layers",
    "layers",
    metavar="PATTERN",
    multiple=True,
    help="Layer name glob to export (quote it); repeatable. Default: every layer.",
)
@click.option(
    "--dtype",
    type=click.Choice(["stored", "float32"]),
    default="stored",
    show_default=True,
    help="stored: the run's storage dtype, bit for bit; float32: widen half precision.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@_clean_errors
def export(
    run_path: Path,
    snapshot: int,
    fmt: str | None,
    output: Path | None,
    layers: tuple[str, ...],
    dtype: str,
    force: bool,
) -> None:
    """Write one snapshot of a run as a state-dict file for other tools.

    The keys are the parameter names (features.0.weight), the tensors have the parameters' own
    shapes and the dtype the run stored (bfloat16 included), so the file is a state dict that
    tools which read safetensors files or torch state dicts accept, e.g. to load into the model
    (model.load_state_dict(safetensors.torch.load_file(path), strict=False)) and analyse it.
    A .pt file is a plain dict of tensors (torch.load(path, weights_only=True)).

    \b
    Examples:
      bstab export runs/cnn-digits-seed0.h5
      bstab export runs/cnn-digits-seed0.h5 -s 10 -o epoch10.pt
      bstab export runs/vit.h5 --layers 'blocks.*' --dtype float32
    """
    from .store.export import _export
    from .store.summary import _size

    result = _export(
        run_path,
        output,
        snapshot=snapshot,
        format=fmt,
        dtype=dtype,
        layers=list(layers) or None,
        force=force,
    )
    click.echo(
        f"Wrote {result.path}: snapshot {result.snapshot} (epoch {result.epoch:g}, "
        f"step {result.step}), {result.n_tensors} tensors, {_size(result.n_bytes)}"
    )


@main.command()
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
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Snapshots apart for the lag pairs and the delay rule.",
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
    "--svd-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
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
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_clean_errors
def analyze(
    run_path: Path,
    output: Path | None,
    lag: int,
    k: int,
    tau: float,
    share: float,
    beta_rule: str,
    min_energy: float,
    target_share: float,
    svd: str,
    svd_dtype: str,
    device: str,
    jobs: int,
    no_cache: bool,
    no_plots: bool,
    follow: bool,
    poll: float,
    idle_timeout: float,
    no_progress: bool,
) -> None:
    """Measure basis stability, top-k overlap, spectra and ranks of a run; recommend OIALR's
    delay and beta.

    Prints a per-layer table and a network summary; writes CSV tables (and Parquet when pyarrow
    is installed), PNG and SVG plots, and plan.json (read by `bstab train --plan`). SVDs are
    cached beside the run (RUN.bstab-cache-*.h5), so re-running only pays for new snapshots; the
    run itself is never modified. Works on a run that is still being recorded.

    \b
    Examples:
      bstab analyze runs/cnn-digits-seed0.h5
      bstab analyze runs/vit.h5 -o out/ --lag 10 --jobs 2
      bstab analyze runs/live.h5 --follow
      torchrun --nproc_per_node=2 -m basis_stability analyze runs/vit.h5

    Under torchrun the SVDs are shared out across the ranks (each may use its own GPU with
    --device cuda); rank 0 gathers them and writes exactly what one process would.
    """
    from .analyze import AnalysisConfig, EngineConfig, distributed
    from .analyze.follow import follow_analysis
    from .recommend import PlanConfig

    if distributed.launched_by_torchrun():
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

    config = AnalysisConfig(lag=lag, k=k)
    engine = EngineConfig(
        svd=svd, svd_dtype=svd_dtype, device=device, jobs=jobs, cache=not no_cache
    )
    plan = PlanConfig(
        tau=tau, share=share, beta_rule=beta_rule, min_energy=min_energy, target_share=target_share
    )
    out = output or run_path.with_name(run_path.stem + "-analysis")
    for text in follow_analysis(
        run_path,
        out,
        config,
        engine,
        plan,
        plots=not no_plots,
        follow=follow,
        poll=poll,
        idle_timeout=idle_timeout,
        progress=not no_progress,
    ):
        click.echo(text)


@main.command()
@click.option("--mode", type=click.Choice(["oialr", "full"]), default="oialr", show_default=True)
@_training_options
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
    "when neither --delay, --beta nor --plan is given).",
)
@click.option(
    "--moments",
    type=click.Choice(["rotate", "slice", "reset"]),
    default="reset",
    show_default=True,
    help="Optimizer-state policy at conversion and truncation.",
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
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_clean_errors
def train(
    mode: str,
    model: str,
    dataset: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    delay: str | None,
    interval: str | None,
    beta: float | None,
    plan_path: Path | None,
    auto: bool | None,
    moments: str,
    output: Path | None,
    force: bool,
    device: str,
    no_progress: bool,
) -> None:
    """Train a built-in model with OIALR (or full-rank), record it, export the compact model.

    OIALR trains full-rank, then freezes each layer's singular bases and trains only a small
    k x k S, cutting singular values below beta * s_1 every interval. By default (--auto) the
    delay and beta come from the stability and spectra measured while training.

    \b
    Examples:
      bstab train
      bstab train --mode full --model vit-tiny
      bstab train --delay 7 --interval 5 --beta 0.15
      bstab train --plan runs/cnn-digits-seed0-analysis/plan.json
    """
    from . import jobs
    from .train import TrainConfig

    if auto and (delay is not None or beta is not None or plan_path is not None):
        raise click.UsageError(
            "--auto chooses delay and beta itself; drop --delay/--beta/--plan or --auto."
        )
    if plan_path is not None and (delay is not None or beta is not None):
        raise click.UsageError("--plan already sets delay and beta; drop --delay/--beta.")
    if beta is not None and not 0 < beta < 1:
        raise click.BadParameter(
            f"Expected --beta in (0, 1) but got {beta}. The reference uses 0.15.",
            param_hint="--beta",
        )
    if output is not None and output.exists() and not force:
        raise click.ClickException(
            f"{output} already exists. Pass --force to overwrite it or "
            "choose another --output; nothing was written."
        )
    job = jobs.TrainJob(
        model,
        dataset,
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed),
        mode,
        delay,
        interval,
        beta,
        str(plan_path) if plan_path else None,
        moments,
        device,
    )
    path = output or jobs.default_run_path(f"train-{mode}-{model}-{dataset}-seed{seed}")
    export = path.with_name(path.stem + "-factorized.pt") if mode == "oialr" else None
    result = jobs.run_train_job(
        job, path, export, mode="overwrite" if force else "create", progress=not no_progress
    )
    last = result.history[-1]
    tail = f", model {result.export_path}" if result.export_path else ""
    click.echo(
        f"val_acc {last['val_acc']:.4f} | trainable {result.trainable_share:.1%} of the "
        f"full-rank model ({result.factorised_share:.1%} of the factorised layers) | "
        f"{result.seconds:.1f} s | run {result.run_path}{tail}"
    )
    if result.export is not None:
        click.echo(f"export: {result.export}")


if __name__ == "__main__":  # pragma: no cover
    main()
