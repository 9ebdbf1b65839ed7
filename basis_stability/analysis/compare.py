"""Compare runs side by side: seeds, full rank against OIALR, learning rates.

:func:`combine` takes each run's analysis (a :class:`~.report.Report` with its plan, as
:func:`basis_stability.analyze` returns it) and its snapshot table, and lays them side by side
in tidy frames, each with a ``run`` column holding the run's short label (:func:`short_labels`).
Runs are aligned by epoch, never by snapshot index, so runs of different lengths or schedules
overlay; "final" always means each run's own last snapshot. :func:`basis_stability.compare`
wires the analyses to it; :mod:`.compare_output` writes the tables and figures.

Example:
    >>> cmp = bs.compare(["runs/full.h5", "runs/oialr.h5"])  # doctest: +SKIP
    >>> cmp.layers  # final S of each run per layer, minus the first run's  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, RunFileError, expected
from ..store.paths import as_path
from ..store.reader import open_run
from .report import Report

RANKS = ("stable_rank", "effective_rank", "energy_rank")
#: the metrics the terminal table and the figures show, where a run logged them
SHOWN_METRICS = ("val_acc", "val_loss", "trainable_share")
LAYER_RANK_COLUMNS = ["layer", "run", "m", "n", "final_S", *RANKS, "rank_beta"]
NETWORK_COLUMNS = ["run", "snapshot", "epoch", "step", "mean_S", "weighted_S", "stable_share"]
METRIC_COLUMNS = ["run", "snapshot", "epoch", "step", "metric", "value"]
_INDEX = ("snapshot", "step", "epoch", "wall_time")  # Run.snapshots() columns that are no metric
_SEPARATORS = "-_. "


@dataclass(frozen=True)
class RunInput:
    """One run to compare: its label, its analysis (plan included) and its snapshot table
    (``Run.snapshots()``: snapshot, step, epoch, wall_time and one column per metric)."""

    label: str
    report: Report
    snapshots: pd.DataFrame


@dataclass
class Comparison:
    """Two or more runs side by side. Frames are tidy; the first run is the reference.

    Attributes:
        paths: label -> run file, in the order given.
        runs: one row per run: ``run``, ``path``, ``snapshots``, ``last_epoch``, the last
            network values (``final_mean_S``, ``final_weighted_S``, ``final_stable_share``),
            the plan (``delay_epoch``, ``beta``, ``expected_trainable_share``) and the last
            logged value of each metric (``final_val_acc``, ...; NaN where a run has none).
        layers: one row per layer of any run: ``layer``, ``m``, ``n``, ``in_runs`` ("all" or
            the runs that have it), ``final_S[<run>]`` per run and ``diff[<run>]`` (its final S
            minus the first run's) for every run after the first.
        layer_ranks: one row per (layer, run): final S and the last snapshot's ranks.
        network: one row per (run, snapshot with a lag pair): mean, weighted S, stable share.
        metrics: one row per (run, snapshot, metric) that was logged.
        x: the column runs are aligned by: ``epoch`` (``step`` when a run has no epochs).
        notes: what the reader should know: layers not in every run, runs of different
            lengths, a run with one snapshot, files given twice.
    """

    paths: dict[str, Path]
    runs: pd.DataFrame
    layers: pd.DataFrame
    layer_ranks: pd.DataFrame
    network: pd.DataFrame
    metrics: pd.DataFrame
    x: str = "epoch"
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return list(self.paths)

    def text(self) -> str:
        """The tables ``bstab compare`` prints: per run, per layer, then the notes."""
        from .compare_text import comparison_lines

        return "\n".join(comparison_lines(self))


# ---------------------------------------------------------------------- which runs, what label
def check_paths(paths: object) -> tuple[list[Path], list[str]]:
    """The run files to compare, each once, and a note for each one given more than once.

    Raises:
        ConfigError: ``paths`` is not a list of paths, or names fewer than two different files.
        RunFileError: a file does not exist (checked before any analysis).
    """
    wanted = "a list of two or more run files"
    fix = 'Pass e.g. ["runs/full.h5", "runs/oialr.h5"].'
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Iterable):
        raise ConfigError(expected("paths", wanted, paths, fix))
    given = [as_path(p, "paths") for p in paths]
    unique: dict[Path, Path] = {}
    notes = []
    for path in given:
        if not path.is_file():
            raise RunFileError(
                f"No run file at {path}. Check the path; `bstab record` prints where it wrote "
                "its run."
            )
        key = path.resolve()
        if key in unique:
            same = "" if str(path) == str(unique[key]) else f" (as {unique[key]})"
            notes.append(f"{path} was given more than once{same}; compared once")
        else:
            unique[key] = path
    if len(unique) < 2:
        shown = [str(p) for p in given]
        why = "The same file given twice counts once. " if len(given) > len(unique) else ""
        raise ConfigError(expected("paths", "two or more different run files", shown, why + fix))
    return list(unique.values()), notes


def _tokens(stem: str) -> list[str]:
    """``"cnn-digits-seed0"`` -> ``["cnn-", "digits-", "seed0"]`` (each keeps its separator)."""
    return [t for t in re.split(f"(?<=[{re.escape(_SEPARATORS)}])", stem) if t]


def _core(token: str) -> str:
    return token.rstrip(_SEPARATORS)


def short_labels(paths: Sequence[Path]) -> list[str]:
    """A short unique label per run: its file stem without the parts all stems share at the
    start and at the end (split at ``-``, ``_``, ``.`` and spaces; every label keeps one part).

    Example:
        >>> short_labels([Path("runs/cnn-digits-seed0.h5"), Path("runs/cnn-digits-seed1.h5")])
        ['seed0', 'seed1']
        >>> short_labels([Path("a/full-cnn.h5"), Path("a/oialr-cnn.h5")])
        ['full', 'oialr']
    """
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):  # the same name in different folders: name the folders
        stems = [f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem for p in paths]
    parts = [_tokens(s) for s in stems]
    cores = [[_core(t) for t in p] for p in parts]
    shortest = min(len(c) for c in cores)
    head = 0
    while head < shortest - 1 and len({c[head] for c in cores}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head - 1 and len({c[-1 - tail] for c in cores}) == 1:
        tail += 1
    labels = ["".join(p[head : len(p) - tail]).strip(_SEPARATORS) for p in parts]
    if len(set(labels)) < len(labels) or not all(labels):
        labels = stems
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    return labels


def default_out_dir(paths: Sequence[Path], labels: Sequence[str]) -> Path:
    """``compare-A-vs-B[-vs-C]`` beside the first run (``compare-A-and-N-more`` for more runs).

    Example:
        >>> default_out_dir([Path("runs/a.h5"), Path("runs/b.h5")], ["a", "b"])
        PosixPath('runs/compare-a-vs-b')
    """
    name = "-vs-".join(labels) if len(labels) <= 3 else f"{labels[0]}-and-{len(labels) - 1}-more"
    name = re.sub(r"[^\w.+-]+", "_", name)[:80]
    return Path(paths[0]).parent / f"compare-{name}"


def snapshot_table(path: Path) -> pd.DataFrame:
    """The run's snapshot table: snapshot, step, epoch, wall_time and every metric."""
    with open_run(path) as run:
        return run.snapshots()


# ---------------------------------------------------------------------- the frames
def combine(inputs: Sequence[RunInput], notes: Sequence[str] = ()) -> Comparison:
    """Lay the analyses of two or more runs side by side (see :class:`Comparison`)."""
    labels = [i.label for i in inputs]
    layer_ranks = _frame([_final_layers(i) for i in inputs], LAYER_RANK_COLUMNS)
    layers, layer_notes = layer_table(layer_ranks, labels)
    x = "epoch" if all(np.isfinite(i.snapshots["epoch"]).any() for i in inputs) else "step"
    out = list(notes) + layer_notes + _run_notes(inputs, layer_ranks, x)
    return Comparison(
        paths={i.label: Path(i.report.run_path) for i in inputs},
        runs=pd.DataFrame([_run_row(i) for i in inputs]),
        layers=layers,
        layer_ranks=layer_ranks,
        network=_frame([_network(i) for i in inputs], NETWORK_COLUMNS),
        metrics=_frame([_metrics(i) for i in inputs], METRIC_COLUMNS),
        x=x,
        notes=out,
    )


def _frame(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _final_layers(run: RunInput) -> pd.DataFrame:
    summary = run.report.summary
    columns = [c for c in LAYER_RANK_COLUMNS if c != "run"]
    frame = summary.reindex(columns=columns).copy()
    frame.insert(1, "run", run.label)
    return frame


def layer_table(layer_ranks: pd.DataFrame, labels: Sequence[str]) -> tuple[pd.DataFrame, list]:
    """One row per layer of any run: final S per run, its difference to the first run's, and
    which runs have the layer; with notes on layers not in every run and shapes that differ."""
    order = list(dict.fromkeys(layer_ranks["layer"]))
    by_layer = layer_ranks.set_index(["layer", "run"])
    wide = layer_ranks.pivot(index="layer", columns="run", values="final_S")
    wide = wide.reindex(index=order, columns=list(labels)).astype(np.float64)
    first = layer_ranks.drop_duplicates("layer").set_index("layer").reindex(order)
    present = {name: [r for r in labels if (name, r) in by_layer.index] for name in order}
    table = pd.DataFrame(
        {
            "layer": order,
            "m": first["m"].to_numpy(),
            "n": first["n"].to_numpy(),
            "in_runs": ["all" if len(p) == len(labels) else ", ".join(p) for p in present.values()],
        }
    )
    for label in labels:
        table[f"final_S[{label}]"] = wide[label].to_numpy()
    for label in labels[1:]:
        table[f"diff[{label}]"] = (wide[label] - wide[labels[0]]).to_numpy()
    return table, _layer_notes(layer_ranks, present, len(labels))


def _layer_notes(layer_ranks: pd.DataFrame, present: dict[str, list[str]], runs: int) -> list:
    notes = []
    partial: dict[tuple[str, ...], list[str]] = {}
    for name, where in present.items():
        if len(where) < runs:
            partial.setdefault(tuple(where), []).append(name)
    if partial:
        groups = "; ".join(f"only in {', '.join(w)}: {', '.join(n)}" for w, n in partial.items())
        notes.append(
            f"layers not in every run are compared where present (column in_runs): {groups}"
        )
    if not any(len(w) == runs for w in present.values()):
        notes.append("the runs have no layer in common: no final-S differences")
    shapes = layer_ranks.groupby("layer", sort=False)[["m", "n"]].nunique()
    for name in shapes.index[(shapes > 1).any(axis=1)]:
        one = layer_ranks[layer_ranks["layer"] == name]
        shown = ", ".join(f"{r.run} {r.m}x{r.n}" for r in one.itertuples())
        notes.append(f"layer {name} has different shapes ({shown}); its S values still compare")
    return notes


def _network(run: RunInput) -> pd.DataFrame:
    net = run.report.network
    columns = [c for c in NETWORK_COLUMNS if c != "run"]
    if net is None or not len(net):
        return pd.DataFrame(columns=NETWORK_COLUMNS)
    frame = net.reindex(columns=columns).copy()
    frame.insert(0, "run", run.label)
    return frame


def _metric_names(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in _INDEX]


def _metrics(run: RunInput) -> pd.DataFrame:
    table = run.snapshots
    names = _metric_names(table)
    if not names:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    long = table.melt(["snapshot", "epoch", "step"], names, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"]).sort_values(["metric", "snapshot"], kind="stable")
    long.insert(0, "run", run.label)
    return long[METRIC_COLUMNS].reset_index(drop=True)


def _last(values: pd.Series) -> float:
    known = values.dropna()
    return float(known.iloc[-1]) if len(known) else math.nan


def _run_row(run: RunInput) -> dict[str, object]:
    report, table, plan = run.report, run.snapshots, run.report.plan
    net = report.network if report.network is not None else pd.DataFrame()
    row: dict[str, object] = {
        "run": run.label,
        "path": str(report.run_path),
        "snapshots": report.n_snapshots,
        "last_epoch": _last(table["epoch"]),
    }
    interval = report.inputs.interval if report.inputs is not None else None
    row["lag_snapshots"] = interval.snapshots if interval else math.nan
    row["lag_epochs"] = interval.epochs if interval and interval.epochs is not None else math.nan
    for column in ("mean_S", "weighted_S", "stable_share"):
        row[f"final_{column}"] = _last(net[column]) if column in net else math.nan
    row["delay_epoch"] = math.nan if plan is None or plan.delay_epoch is None else plan.delay_epoch
    row["beta"] = math.nan if plan is None else plan.beta
    row["expected_trainable_share"] = math.nan if plan is None else plan.expected_trainable_share
    for name in _metric_names(table):
        if not name.startswith("rank/"):  # per-layer OIALR ranks: in `metrics`, not here
            row[f"final_{name}"] = _last(table[name])
    return row


def _run_notes(inputs: Sequence[RunInput], layer_ranks: pd.DataFrame, x: str) -> list[str]:
    notes = []
    if x == "step":
        notes.append("a run has no epochs: the runs are aligned by optimizer step")
    ends = {i.label: _last(i.snapshots[x]) for i in inputs}
    if len(set(ends.values())) > 1:
        shown = ", ".join(f"{label} {end:g}" for label, end in ends.items())
        notes.append(
            f"the runs end at different {x}s ({shown}): figures align them by {x}, and "
            "'final' is each run's own last snapshot"
        )
    notes += _lag_notes(inputs)
    for run in inputs:
        if run.report.live is not None:
            notes.append(
                f"{run.label} is {run.report.live}: its numbers cover the "
                f"{run.report.n_snapshots} snapshots committed when it was read"
            )
        if run.report.n_snapshots == 1:
            notes.append(
                f"{run.label} has one snapshot: no stability pairs, so no final S or mean "
                "stability; its ranks and metrics are compared"
            )
            continue
        mine = layer_ranks[layer_ranks["run"] == run.label]
        undefined = mine.loc[mine["final_S"].isna(), "layer"].tolist()
        if undefined:
            notes.append(
                f"{run.label}: final S undefined for {', '.join(undefined)} (basis not unique at "
                "the last lag pair, e.g. a layer OIALR truncated to rank k < n; see "
                "bs.analyze(run).notes)"
            )
    return notes


def _lag_notes(inputs: Sequence[RunInput]) -> list[str]:
    """A note when the runs' lag pairs are different distances apart (e.g. a short run whose
    lag was reduced): their S values then measure different things."""
    lags = {}
    for run in inputs:
        row = _run_row(run)
        if run.report.n_snapshots > 1:
            epochs, snaps = row["lag_epochs"], row["lag_snapshots"]
            lags[run.label] = (
                f"{epochs:g} epochs" if math.isfinite(epochs) else f"{snaps} snapshots"
            )
    if len(set(lags.values())) <= 1:
        return []
    shown = ", ".join(f"{label} {lag}" for label, lag in lags.items())
    return [
        f"the lag pairs are different distances apart ({shown}), so their S values are not "
        "directly comparable (pass one `lag` every run reaches)"
    ]
