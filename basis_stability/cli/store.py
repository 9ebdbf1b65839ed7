"""Commands that read a run file: ``bstab inspect``, ``validate`` and ``export``."""

from __future__ import annotations

from pathlib import Path

import click

from ._errors import clean_errors
from ._options import check_output


@click.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@click.option("--no-scan", is_flag=True, help="Skip the NaN/Inf scan (reads every snapshot).")
@clean_errors
def inspect(run_path: Path, no_scan: bool) -> None:
    """Print a readable summary of a run: layers, shapes, snapshots, metrics, size."""
    from ..store.summary import summarize

    click.echo(summarize(run_path, scan=not no_scan))


@click.command()
@click.argument("run_path", metavar="RUN.h5", type=click.Path(path_type=Path))
@clean_errors
def validate(run_path: Path) -> None:
    """Check a run file against the format spec (checkpoints_spec/) and list findings.

    Exits 1 when any finding is an error.
    """
    from ..store.validate import validate_run

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


@click.command()
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
    help="Layer name glob to export (quote it), with its module's bias; repeatable. Default: "
    "every layer and all the stored state.",
)
@click.option(
    "--dtype",
    type=click.Choice(["stored", "float32"]),
    default="stored",
    show_default=True,
    help="stored: the run's storage dtype, bit for bit; float32: widen half precision.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@clean_errors
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
    tools which read safetensors files or torch state dicts accept. With the matrices come the
    biases, norm weights and buffers the run stores (recorded by default, not with
    --no-biases): when every >= 2-D parameter was recorded, the file is the model's complete
    state dict (model.load_state_dict(safetensors.torch.load_file(path)) accepts it); otherwise
    a second line names the keys it lacks (also in the file's metadata, missing_keys).
    A .pt file is a plain dict of tensors (torch.load(path, weights_only=True)).

    \b
    Examples:
      bstab export runs/cnn-digits-seed0.h5
      bstab export runs/cnn-digits-seed0.h5 -s 10 -o epoch10.pt
      bstab export runs/vit.h5 --layers 'blocks.*' --dtype float32
    """
    from ..exporting.snapshot import write_snapshot
    from ..store.summary import human_size

    if output is not None:
        check_output(output)
    elif run_path.is_file():  # the default file goes beside the run
        check_output(run_path.with_name(f"{run_path.stem}-snapshot.{fmt or 'safetensors'}"))
    result = write_snapshot(
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
        f"step {result.step}), {result.n_tensors} tensors, {human_size(result.n_bytes)}"
    )
    line = result.missing_line()
    if line is not None:
        click.echo(line)
