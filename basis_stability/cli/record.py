"""``bstab record``: train a built-in model (or read checkpoints) into a run file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._errors import clean_errors, render
from ._options import check_output, show_progress, training_config, training_options


@click.command()
@training_options
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
    "--no-biases",
    is_flag=True,
    help="Record the matrices only: not the biases, norm weights and buffers (running "
    "statistics) that make an exported snapshot a complete state dict.",
)
@click.option(
    "--no-background",
    is_flag=True,
    help="Write each snapshot before training goes on, instead of on a background thread "
    "(which costs one host copy of the recorded weights).",
)
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
@click.option("--no-progress", is_flag=True, help="Hide progress bars (shown only on a terminal).")
@clean_errors
def record(
    model: str,
    dataset: str,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    warmup: float,
    lr_schedule: str,
    schedule: str,
    dtype: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    types: tuple[str, ...],
    no_biases: bool,
    no_background: bool,
    output: Path | None,
    force: bool,
    checkpoints: str | None,
    device: str,
    list_only: bool,
    no_progress: bool,
) -> None:
    """Train a built-in model and snapshot its layers into a run file.

    With no options: the cnn on scikit-learn's digits for 40 epochs, a snapshot of the initial
    weights and one after every epoch. Each snapshot holds the layer matrices and (unless
    --no-biases) the biases, norm weights and buffers, so that `bstab export` gives a complete
    state dict. With --from-checkpoints 'ckpts/epoch_*.pt' (quote it), the snapshots come from
    existing state dicts (.pt or .safetensors), ordered by the epoch/step in their names
    (epoch=3-step=120) or their own epoch/global_step entries, else by name; the file ->
    epoch/step table is printed first (those runs hold the matrices only).

    \b
    Examples:
      bstab record
      bstab record --model vit-tiny --epochs 60 --schedule every:10 -o runs/vit.h5
      bstab record --from-checkpoints 'ckpts/epoch_*.pt' -o runs/mine.h5
    """
    from .. import jobs

    rec_cfg = _record_config(include, exclude, types, dtype, no_biases, no_background)
    stem = f"{model}-{dataset}-seed{seed}" if checkpoints is None else "checkpoints"
    if not list_only:  # an existing --output is the writer's to refuse (or --force to replace)
        check_output(output or jobs.default_run_path(stem))
    if checkpoints is not None:
        _record_checkpoints(
            checkpoints, rec_cfg, output, force, list_only, show_progress(no_progress)
        )
        return
    train = training_config(epochs, batch_size, lr, optimizer, seed, warmup, lr_schedule)
    job = jobs.RecordJob(
        model=model, dataset=dataset, train=train, record=rec_cfg, schedule=schedule, device=device
    )
    if list_only:
        _print_model_selection(job)
        return
    _record_training(job, stem, output, force, show_progress(no_progress))


def _record_config(
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    types: tuple[str, ...],
    dtype: str,
    no_biases: bool,
    no_background: bool,
) -> Any:
    """The :class:`~basis_stability.recording.RecordConfig` the options ask for."""
    from ..recording import RecordConfig

    return RecordConfig(
        include=include or None,
        exclude=exclude or None,
        types=types or None,
        dtype=dtype,
        biases=not no_biases,
        background=not no_background,
    )


def _print_model_selection(job: Any) -> None:
    """``--list``: the layers of the built model that the job would record and skip."""
    from .. import jobs
    from ..views import select_layers

    net, _ = jobs.build(job)
    cfg = job.record
    _print_selection(select_layers(net, cfg.include, cfg.exclude, cfg.types))


def _record_training(job: Any, stem: str, output: Path | None, force: bool, progress: bool) -> None:
    """Train ``job`` into ``output`` (else the first free default name) and say where."""
    from .. import jobs

    def run(path: Path) -> jobs.RecordResult:
        mode = "overwrite" if force and output else "create"  # a default name is always new
        return jobs.run_record_job(job, path, mode=mode, progress=progress)

    result = run(output) if output else jobs.at_free_path(stem, run)
    click.echo(
        f"Recorded {result.n_snapshots} snapshots of {result.n_layers} layers "
        f"(final {result.summary()}) to {result.path}"
    )
    click.echo(f"Next: bstab inspect {result.path}")


def _record_checkpoints(
    pattern: str, cfg: Any, output: Path | None, force: bool, list_only: bool, progress: bool
) -> None:
    from ..jobs import at_free_path
    from ..recording.checkpoints import scan_checkpoints, write_checkpoints
    from ..store import open_run

    found = scan_checkpoints(pattern, cfg)  # every file opened and checked; nothing written
    click.echo(found.describe())
    if list_only:
        _print_selection(found.selection)
        return

    def write(path: Path) -> Path:
        replace = force and output is not None  # a default name is new: created, never replaced
        return write_checkpoints(found, path, force=replace, progress=progress)

    path = write(output) if output else at_free_path("checkpoints", write)
    with open_run(path) as run:
        click.echo(f"Recorded {run.n_snapshots} checkpoints of {len(run.layers)} layers to {path}")


def _print_selection(selection: Any) -> None:
    click.echo(f"{len(selection.views)} layers selected:")
    for v in selection.views:
        click.echo(f"  {v.name:40s} {v.kind:10s} {v.shape[0]}x{v.shape[1]}")
    if selection.skipped:
        click.echo(f"{len(selection.skipped)} skipped:")
        click.echo(render(selection.describe_skipped(), "record"))
