"""Plots of a comparison of runs (:func:`basis_stability.compare`): one colour per run.

Every function takes one of the tidy frames of a
:class:`~basis_stability.analysis.compare.Comparison` (each has a ``run`` column), draws on an
optional matplotlib ``ax`` and returns the ``Axes``. Runs are drawn in the order they first
appear in the frame, with the same colour in every figure, and the legend is read off the
``run`` column and placed outside the axes, at their right, so it never covers a point. Layers
are labelled as in :mod:`basis_stability.plots`: without the prefix all their names share (the
axis label says which). Nothing here reads a file or computes an SVD. Kept apart from
:mod:`basis_stability.plots` (one run's figures); like it, it imports matplotlib.

Example:
    >>> cmp = bs.compare(["runs/full.h5", "runs/oialr.h5"])  # doctest: +SKIP
    >>> ax = bs.plots_compare.stability_over_epochs(cmp.network)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator, PercentFormatter

from .errors import ConfigError, expected
from .plots import check_frame, layer_axis_label, new_axes, short_names

S_LABEL = "stability S = tr(B_aᵀB_b)/n"
VALUE_LABELS = {
    "mean_S": "mean S over layers",
    "weighted_S": "mean S weighted by m·n",
    "stable_share": "parameter share of layers with S ≥ τ",
}
METRIC_LABELS = {
    "val_acc": "validation accuracy",
    "val_loss": "validation loss",
    "acc": "training accuracy",
    "loss": "training loss",
    "trainable_share": "trainable share of the full-rank model",
    "factorised_share": "factorised share",
    "lr": "learning rate",
}
RANK_LABELS = {
    "stable_rank": "stable rank ‖W‖²_F / σ₁²",
    "effective_rank": "effective rank exp(H(p))",
    "energy_rank": "energy rank r(ε)",
    "rank_beta": "rank at the plan's β",
}
_SHARES = ("stable_share", "trainable_share", "factorised_share", "val_acc", "acc")
_MARKERS = "osD^vP*Xh<>"


def _runs(df: pd.DataFrame, runs: Sequence[str] | None) -> list[str]:
    """The run order that fixes each run's colour: ``runs``, else the frame's own order."""
    return list(runs) if runs is not None else list(dict.fromkeys(df["run"]))


def _legend(ax: Axes) -> None:
    """The runs' legend outside the axes, at their right: off the data whatever it shows (a
    constrained-layout figure makes room for it)."""
    ax.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _style(j: int) -> dict[str, object]:
    return {"color": f"C{j}", "marker": _MARKERS[j % len(_MARKERS)], "ms": 4}


def _lines(ax: Axes, df: pd.DataFrame, x: str, y: str, runs: list[str], share: bool) -> None:
    """One line per run of ``y`` against ``x``; a run without rows keeps its colour unused."""
    for j, run in enumerate(runs):
        one = df[df["run"] == run].sort_values(x)
        if len(one):
            ax.plot(one[x], one[y], label=str(run), **_style(j))
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if share:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    _legend(ax)
    ax.grid(alpha=0.3)


def stability_over_epochs(
    network: pd.DataFrame,
    value: str = "mean_S",
    x: str = "epoch",
    runs: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw each run's network-level stability (``network`` of a comparison) against ``x``.

    Args:
        network: ``Comparison.network`` (columns run, ``x``, ``value``).
        value: ``mean_S`` (the paper's mean over layers), ``weighted_S`` or ``stable_share``.
        x: ``epoch`` (default) or ``step``: runs of different lengths align on it.
        runs: the runs in colour order (``cmp.labels``), so that every figure gives a run
            the same colour; default: their order in the frame.
        ax: axes to draw on; a new figure when None.

    Example:
        >>> ax = stability_over_epochs(cmp.network)  # doctest: +SKIP
    """
    check_frame(network, "network", ["run", x, value], empty_ok=True)
    ax = new_axes(ax)
    _lines(ax, network, x, value, _runs(network, runs), value == "stable_share")
    ax.set(xlabel=x, ylabel=VALUE_LABELS.get(value, value) if value != "mean_S" else S_LABEL)
    ax.set_title(f"Network-level basis stability ({VALUE_LABELS.get(value, value)})")
    return ax


def metric_over_epochs(
    metrics: pd.DataFrame,
    metric: str = "val_acc",
    x: str = "epoch",
    runs: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw one logged metric of each run that has it (``metrics`` of a comparison).

    Args:
        metrics: ``Comparison.metrics`` (columns run, metric, value, ``x``).
        metric: e.g. ``val_acc``, ``val_loss``, ``trainable_share``.
        x: ``epoch`` or ``step``.
        runs: the runs in colour order (``cmp.labels``); default: their order in the frame.
        ax: axes to draw on; a new figure when None.

    Example:
        >>> ax = metric_over_epochs(cmp.metrics, "val_loss")  # doctest: +SKIP
    """
    check_frame(metrics, "metrics", ["run", "metric", "value", x], empty_ok=True)
    one = metrics[metrics["metric"] == metric]
    if one.empty:
        logged = ", ".join(sorted(set(metrics["metric"]))) or "none"
        raise ConfigError(expected("metric", f"one the runs logged ({logged})", metric, ""))
    ax = new_axes(ax, (6.0, 3.8))
    _lines(ax, one, x, "value", _runs(metrics, runs), metric in _SHARES)
    label = METRIC_LABELS.get(metric, metric)
    ax.set(xlabel=x, ylabel=label, title=label.capitalize())
    return ax


def _by_layer(ax: Axes, df: pd.DataFrame, column: str, runs: list[str]) -> None:
    """Per layer (x, model order), one marker per run side by side; NaN is left out."""
    layers = list(dict.fromkeys(df["layer"]))
    width = 0.7 / max(len(runs), 1)
    where = {name: i for i, name in enumerate(layers)}
    for j, run in enumerate(runs):
        one = df[df["run"] == run]
        if one.empty:
            continue
        xs = np.array([where[n] for n in one["layer"]]) + (j - (len(runs) - 1) / 2) * width
        ax.plot(xs, one[column].to_numpy(dtype=float), ls="none", label=str(run), **_style(j))
    ax.set_xticks(
        range(len(layers)),
        short_names([str(n) for n in layers]),
        rotation=45 if len(layers) > 6 else 0,
        ha="right" if len(layers) > 6 else "center",
        rotation_mode="anchor",
    )
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel(layer_axis_label([str(n) for n in layers]))
    ax.grid(alpha=0.3, axis="y")
    _legend(ax)


def final_stability(
    layer_ranks: pd.DataFrame, runs: Sequence[str] | None = None, ax: Axes | None = None
) -> Axes:
    """Draw each layer's final S (its last lag pair) in each run, side by side.

    Args:
        layer_ranks: ``Comparison.layer_ranks`` (columns layer, run, final_S). A layer whose
            final S is undefined (NaN) in a run has no marker for that run.
        runs: the runs in colour order (``cmp.labels``); default: their order in the frame.
        ax: axes to draw on; a new figure when None.

    Example:
        >>> ax = final_stability(cmp.layer_ranks)  # doctest: +SKIP
    """
    check_frame(layer_ranks, "layer_ranks", ["layer", "run", "final_S"], empty_ok=True)
    ax = new_axes(ax)
    _by_layer(ax, layer_ranks, "final_S", _runs(layer_ranks, runs))
    ax.set(ylabel=S_LABEL, title="Final basis stability per layer (last lag pair)")
    return ax


def ranks_by_layer(
    layer_ranks: pd.DataFrame,
    rank: str = "effective_rank",
    runs: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw one rank of each layer at each run's last snapshot, with the full rank n as a grey
    dash.

    Args:
        layer_ranks: ``Comparison.layer_ranks`` (columns layer, run, n, ``rank``).
        rank: ``stable_rank``, ``effective_rank``, ``energy_rank`` or ``rank_beta``.
        runs: the runs in colour order (``cmp.labels``); default: their order in the frame.
        ax: axes to draw on; a new figure when None.

    Example:
        >>> ax = ranks_by_layer(cmp.layer_ranks, "energy_rank")  # doctest: +SKIP
    """
    check_frame(layer_ranks, "layer_ranks", ["layer", "run", "n", rank], empty_ok=True)
    ax = new_axes(ax)
    full = layer_ranks.drop_duplicates("layer")
    ax.plot(
        range(len(full)),
        full["n"].to_numpy(dtype=float),
        ls="none",
        marker="_",
        ms=18,
        color="0.5",
        label="full rank n",
    )
    _by_layer(ax, layer_ranks, rank, _runs(layer_ranks, runs))
    ax.set_ylim(bottom=0)
    label = RANK_LABELS.get(rank, rank)
    title = f"{rank.replace('_', ' ')} per layer, last snapshot"
    ax.set(ylabel=label, title=title[0].upper() + title[1:])
    return ax
