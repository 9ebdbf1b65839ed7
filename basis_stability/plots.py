"""Plots of the analysis frames: stability heatmaps, network curves, spectra, ranks and beta.

Every function takes one of the tidy frames of :mod:`basis_stability.analysis` (schemas in
SPEC §2-§5), draws on an optional matplotlib ``ax`` and returns the ``Axes`` (``spectra_grid``
returns its ``Figure``). Nothing here reads a file or computes an SVD; :func:`save_figure` is the
only function that writes, and it writes only the figure it is given. Layers are always drawn in
model order, i.e. the order in which they first appear in the frame.

This module imports matplotlib, so ``basis_stability/__init__.py`` never imports it. It never
chooses a backend either: scripts get matplotlib's default, notebooks keep theirs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import PercentFormatter

from .errors import ConfigError, expected, positive_int

S_LABEL = "stability S = tr(B_aᵀB_b)/n"
MAX_TICK_LABELS = 25
# Heatmap colours: S lives in [-1, 1] but everything the method decides happens between 0.8 and
# 1.0 (the paper's curves sit at 0.76-1.0; tau is ~0.9-0.99). A fixed two-slope norm (-1, 0.8, 1)
# keeps the full range, so figures of different runs compare, yet gives [0.8, 1] half of a
# sequential, colour-blind-safe map (viridis): bright = settled basis, dark = moving.
S_TICKS = (-1.0, 0.0, 0.8, 0.9, 0.95, 1.0)  # >= 1/8 of the bar apart under that norm
PAIR_WORDS = {
    "consecutive": "consecutive snapshots",
    "final": "vs the final snapshot",
    "initial": "vs the first snapshot",
}
RANK_LABELS = {
    "stable_rank": "stable rank ‖W‖²_F / σ₁² (directions)",
    "effective_rank": "effective rank exp H(p) (directions)",
    "energy_rank": "energy rank r(ε) (directions)",
    "rank_beta": "rank at β, #{σ_i ≥ β σ₁} (directions)",
}


# --------------------------------------------------------------------------- input checks
def _check_frame(df: object, arg: str, columns: Sequence[str]) -> pd.DataFrame:
    """Raise a ConfigError unless ``df`` is a non-empty DataFrame holding ``columns``."""
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(
            f"Expected `{arg}` to be a pandas DataFrame but got {type(df).__name__}. "
            f"Pass the `{arg}` frame from basis_stability.analysis."
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(
            f"Expected `{arg}` to have the column(s) {', '.join(map(repr, missing))} but got a "
            f"frame with columns {list(df.columns)}. Pass the `{arg}` frame from "
            "basis_stability.analysis or rename the column."
        )
    if df.empty:
        raise ConfigError(
            f"Expected `{arg}` to hold at least one row but got an empty frame. "
            "Analyse a run with at least two snapshots before plotting it."
        )
    return df


def _check_column(df: pd.DataFrame, frame: str, arg: str, column: str) -> None:
    """Raise a ConfigError naming ``arg`` unless ``column`` is a numeric column of ``df``."""
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    if column not in numeric:
        raise ConfigError(
            expected(
                arg,
                f"a numeric column of `{frame}`",
                column,
                f"Pick one of {', '.join(numeric)}.",
            )
        )


def _check_layer(df: pd.DataFrame, arg: str, layer: str) -> None:
    """Raise a ConfigError naming ``arg`` unless ``layer`` appears in ``df``."""
    layers = _layer_order(df)
    if layer not in layers:
        shown = ", ".join(layers[:5]) + (f", ... ({len(layers)} in all)" if len(layers) > 5 else "")
        raise ConfigError(expected(arg, "a layer of the frame", layer, f"Known layers: {shown}."))


# --------------------------------------------------------------------------- shared helpers
def _layer_order(df: pd.DataFrame) -> list[str]:
    """Layers in model order (first appearance in the frame)."""
    return list(pd.unique(df["layer"]))


def _axes(ax: Axes | None, size: tuple[float, float] = (7.0, 4.0)) -> Axes:
    """Return ``ax``, or the axes of a new constrained-layout figure of ``size`` inches."""
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size, layout="constrained")
    return new


def _label_points(key: str) -> float:
    """Font size, in points, of tick labels set by rcParams ``key`` (e.g. 'ytick.labelsize')."""
    return FontProperties(size=plt.rcParams[key]).get_size_in_points()


def _tick_step(n: int, room_pts: float, label_pts: float) -> int:
    """Show every k-th of ``n`` labels so that each gets ``label_pts`` and at most 25 show."""
    fits = max(1, int(room_pts // label_pts))
    return max(1, math.ceil(n / min(fits, MAX_TICK_LABELS)))


def _thin_ticks(ax: Axes, axis: str, labels: Sequence[str]) -> None:
    """Put a tick on every row (axis 'y') or column ('x') but a label only on every k-th.

    k is chosen from the axes' size in points so that labels never overlap, and so that at most
    25 show: each y label needs ~1.8 font heights, each x label ~0.7 font sizes per character.
    """
    width, height = ax.get_position().size * ax.figure.get_size_inches() * 72  # points
    font = _label_points(f"{axis}tick.labelsize")
    if axis == "y":
        step = _tick_step(len(labels), height, 1.8 * font)
    else:
        step = _tick_step(len(labels), width, (0.7 * max(map(len, labels)) + 1.5) * font)
    shown = np.arange(0, len(labels), step)
    set_ticks = ax.set_yticks if axis == "y" else ax.set_xticks
    set_ticks(shown, [labels[i] for i in shown])
    set_ticks(np.arange(len(labels)), minor=True)


def _epoch_colours(epochs: np.ndarray, cmap: str = "viridis") -> ScalarMappable:
    """A colour mapping from epoch to colour, also usable for a colour bar."""
    lo, hi = float(np.min(epochs)), float(np.max(epochs))
    return ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1.0), plt.get_cmap(cmap))


# --------------------------------------------------------------------------- stability
def _stability_matrix(stability: pd.DataFrame, pair: str, value: str) -> pd.DataFrame:
    """(layers, epochs) table of ``value`` for one pair kind, layers in model order."""
    sub = stability[stability["pair"] == pair]
    if sub.empty:
        kinds = ", ".join(map(str, pd.unique(stability["pair"])))
        raise ConfigError(expected("pair", "a pair kind of `stability`", pair, f"Use {kinds}."))
    dup = sub.duplicated(["layer", "epoch_b"])
    if dup.any():
        layer, epoch = sub.loc[dup, ["layer", "epoch_b"]].iloc[0]
        raise ConfigError(
            f"Expected `stability` to hold one {pair!r} row per (layer, epoch_b) but got several "
            f"for ({layer!r}, {epoch:g}). Filter it to one lag first, e.g. "
            "stability[stability.lag == 5].",
            argument="stability",
        )
    table = sub.pivot(index="layer", columns="epoch_b", values=value)
    return table.reindex(index=_layer_order(sub), columns=sorted(table.columns))


def _pair_words(stability: pd.DataFrame, pair: str) -> str:
    """'lag 5', 'consecutive snapshots', ... for titles and colour bar labels."""
    if pair == "lag" and "lag" in stability.columns:
        lags = pd.unique(stability.loc[stability["pair"] == "lag", "lag"])
        return f"lag {lags[0]}" if len(lags) == 1 else "lag"
    return PAIR_WORDS.get(pair, pair)


def stability_heatmap(
    stability: pd.DataFrame, pair: str = "lag", value: str = "S", ax: Axes | None = None
) -> Axes:
    """Draw a layer x epoch heatmap of the stability of one pair kind (the paper's figure).

    Rows are layers in model order, columns the epoch of the later snapshot b. Undefined values
    (NaN) are grey. With many layers only every k-th row is labelled; a new figure grows with the
    number of layers.

    Args:
        stability: the stability frame (columns layer, pair, epoch_b and ``value``).
        pair: which pair kind to show: "lag", "consecutive", "final" or "initial".
        value: the column coloured, e.g. "S", "O_left" or "O_right".
        ax: axes to draw on; a new figure is made when None.

    Returns:
        The axes, with the image in ``ax.images[0]`` and its colour bar.

    Example:
        >>> ax = stability_heatmap(stability, pair="lag")
        >>> ax.images[0].get_array().shape  # (layers, epochs)
        (3, 5)
    """
    _check_frame(stability, "stability", ["layer", "pair", "epoch_b"])
    _check_column(stability, "stability", "value", value)
    table = _stability_matrix(stability, pair, value)
    n_layers, n_epochs = table.shape
    ax = _axes(ax, (min(4.0 + 0.3 * n_epochs, 14.0), min(max(3.0, 1.5 + 0.2 * n_layers), 16.0)))
    cmap: Colormap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.8, vmax=1.0)  # a fresh one: norms are mutable
    image = ax.imshow(table.to_numpy(float), cmap=cmap, norm=norm, aspect="auto")
    words = _pair_words(stability, pair)
    name = "stability S" if value == "S" else value
    bar = ax.figure.colorbar(image, ax=ax, ticks=S_TICKS)
    bar.set_label(f"{name} ({words})")
    _thin_ticks(ax, "y", [str(layer) for layer in table.index])
    _thin_ticks(ax, "x", [f"{epoch:g}" for epoch in table.columns])
    ax.set_xlabel("epoch (of the later snapshot b)")
    ax.set_ylabel("layer (model order)")
    grey = "; grey = undefined" if table.isna().to_numpy().any() else ""
    ax.set_title(f"Per-layer {name}, {words}{grey}")
    return ax


def mean_stability(
    network: pd.DataFrame,
    delay_epoch: float | None = None,
    tau: float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw the network-level stability curves, the chosen delay and the threshold tau.

    Plots mean_S and weighted_S against epoch; stable_share (when present) is a dashed line on
    a twin axis at the right.

    Args:
        network: the network frame (columns epoch, mean_S, weighted_S, optional stable_share).
        delay_epoch: the chosen delay d, in epochs, marked by a vertical line and a note.
        tau: the stability threshold, marked by a horizontal line.
        ax: axes to draw on; a new figure is made when None.

    Returns:
        The (left) axes.

    Example:
        >>> ax = mean_stability(network, delay_epoch=50, tau=0.95)
        >>> ax.get_title()
        'Network-level basis stability'
    """
    _check_frame(network, "network", ["epoch", "mean_S", "weighted_S"])
    df = network.sort_values("epoch")
    ax = _axes(ax)
    ax.plot(df["epoch"], df["mean_S"], marker="o", ms=3, label="mean S over layers")
    ax.plot(df["epoch"], df["weighted_S"], marker="s", ms=3, label="mean S weighted by m·n")
    if tau is not None:
        ax.axhline(tau, color="0.4", ls="--", lw=1, label=f"threshold τ = {tau:g}")
    if delay_epoch is not None:
        _mark_x(ax, delay_epoch, f"delay d = epoch {delay_epoch:g}", f"delay d = {delay_epoch:g}")
    axes = [ax]
    if "stable_share" in df.columns and df["stable_share"].notna().any():
        axes.append(_twin_share(ax, "parameter share of layers with S ≥ τ (%)"))
        axes[1].plot(df["epoch"], df["stable_share"], color="C2", ls="--", label="stable share")
    _legend(axes, "lower right")
    ax.set_xlabel("epoch")
    ax.set_ylabel(S_LABEL)
    ax.set_title("Network-level basis stability")
    return ax


def _twin_share(ax: Axes, ylabel: str) -> Axes:
    """A right-hand axis for shares in [0, 1], shown as percent."""
    twin = ax.twinx()
    twin.set_ylim(0.0, 1.05)
    twin.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    twin.set_ylabel(ylabel)
    ax.set_zorder(twin.get_zorder() + 1)  # main curves and the legend above the twin's line
    ax.patch.set_visible(False)
    return twin


def _legend(axes: Sequence[Axes], loc: str) -> None:
    """One legend, on the first axes, for the labelled series of all ``axes``."""
    pairs = [each.get_legend_handles_labels() for each in axes]
    handles = [h for hs, _ in pairs for h in hs]
    labels = [label for _, ls in pairs for label in ls]
    axes[0].legend(handles, labels, loc=loc, fontsize="small")


def _mark_x(ax: Axes, x: float, label: str, note: str) -> None:
    """Vertical line at ``x`` (gid 'marker') with a note at the top, kept inside the axes."""
    ax.axvline(x, color="k", ls=":", lw=1.2, label=label, gid="marker")
    lo, hi = ax.get_xlim()
    right_half = x > (lo + hi) / 2
    ax.annotate(
        note,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(-4 if right_half else 4, -4),
        textcoords="offset points",
        ha="right" if right_half else "left",
        va="top",
        fontsize="small",
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
    )


# --------------------------------------------------------------------------- spectra
def _draw_spectrum(ax: Axes, one: pd.DataFrame, colours: ScalarMappable, column: str) -> None:
    """One line per snapshot of one layer's spectrum, coloured by epoch."""
    for _, snap in one.sort_values(["snapshot", "i"]).groupby("snapshot", sort=True):
        colour = colours.to_rgba(float(snap["epoch"].iloc[0]))
        ax.plot(snap["i"], snap[column], color=colour, lw=1.0)


def _sigma_label(relative: bool) -> str:
    return "relative singular value σ_i / σ₁" if relative else "singular value σ"


def spectrum(
    spectra: pd.DataFrame,
    layer: str,
    ax: Axes | None = None,
    relative: bool = False,
    log: bool = True,
) -> Axes:
    """Draw one layer's singular values over training, one line per snapshot.

    Args:
        spectra: the spectra frame (columns layer, snapshot, epoch, i, sigma, sigma_rel).
        layer: the layer to show.
        ax: axes to draw on; a new figure is made when None.
        relative: plot sigma / sigma_1 instead of sigma.
        log: use a logarithmic y axis.

    Returns:
        The axes; ``ax.lines`` holds one line per snapshot in snapshot order.

    Example:
        >>> ax = spectrum(spectra, "blocks.0.mlp.fc1", relative=True)
        >>> len(ax.lines) == spectra.loc[spectra.layer == "blocks.0.mlp.fc1", "snapshot"].nunique()
        True
    """
    column = "sigma_rel" if relative else "sigma"
    _check_frame(spectra, "spectra", ["layer", "snapshot", "epoch", "i", column])
    _check_layer(spectra, "layer", layer)
    one = spectra[spectra["layer"] == layer]
    ax = _axes(ax)
    colours = _epoch_colours(one["epoch"].to_numpy())
    _draw_spectrum(ax, one, colours, column)
    ax.figure.colorbar(colours, ax=ax, label="epoch")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index i (descending σ)")
    ax.set_ylabel(_sigma_label(relative))
    ax.set_title(f"Singular values of {layer} over training")
    return ax


def _evenly_spaced(items: list[str], count: int) -> list[str]:
    """``count`` items evenly spaced over ``items``, first and last included."""
    if len(items) <= count:
        return items
    picks = np.round(np.linspace(0, len(items) - 1, count)).astype(int)
    return [items[i] for i in picks]


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def spectra_grid(
    spectra: pd.DataFrame,
    layers: Sequence[str] | None = None,
    max_layers: int = 16,
    relative: bool = True,
) -> Figure:
    """Draw small multiples of the spectra, one panel per layer, with one shared colour bar.

    When more than ``max_layers`` layers are asked for, evenly spaced ones (first and last
    included) are drawn and the suptitle says so.

    Args:
        spectra: the spectra frame (columns layer, snapshot, epoch, i, sigma, sigma_rel).
        layers: layers to show, in the order given; all layers in model order when None.
        max_layers: the most panels to draw.
        relative: plot sigma / sigma_1 (comparable across layers) instead of sigma.

    Returns:
        The figure; panel titles are the layer names.

    Example:
        >>> fig = spectra_grid(spectra, max_layers=9)
        >>> save_figure(fig, "out/spectra")
        [PosixPath('out/spectra.png'), PosixPath('out/spectra.svg')]
    """
    column = "sigma_rel" if relative else "sigma"
    _check_frame(spectra, "spectra", ["layer", "snapshot", "epoch", "i", column])
    max_layers = positive_int("max_layers", max_layers, "Use e.g. 16.")
    wanted = _layer_order(spectra) if layers is None else list(layers)
    for layer in wanted:
        _check_layer(spectra, "layers", layer)
    chosen = _evenly_spaced(wanted, max_layers)
    ncols = math.ceil(math.sqrt(len(chosen)))
    nrows = math.ceil(len(chosen) / ncols)
    size = (2.8 * ncols + 1.2, 2.3 * nrows + 0.8)
    fig, grid = plt.subplots(
        nrows, ncols, figsize=size, layout="constrained", sharey=relative, squeeze=False
    )
    colours = _epoch_colours(spectra["epoch"].to_numpy())
    for n, (ax, layer) in enumerate(zip(grid.flat, chosen)):
        _draw_spectrum(ax, spectra[spectra["layer"] == layer], colours, column)
        ax.set_yscale("log")
        ax.set_title(_short(layer), fontsize="small")
        ax.set_xlabel("index i" if n + ncols >= len(chosen) else "")
        ax.set_ylabel(_sigma_label(relative) if n % ncols == 0 else "")
    for ax in grid.flat[len(chosen) :]:
        ax.set_visible(False)
    fig.colorbar(colours, ax=grid.flat[: len(chosen)], label="epoch")
    kind = "relative singular values σ_i / σ₁" if relative else "singular values σ"
    note = f"all {len(chosen)} layers"
    if len(chosen) < len(wanted):
        note = f"{len(chosen)} of {len(wanted)} layers, evenly spaced"
    fig.suptitle(f"Spectra over training: {kind} ({note})")
    return fig


# --------------------------------------------------------------------------- ranks and beta
def rank_trajectories(
    ranks: pd.DataFrame, column: str = "stable_rank", ax: Axes | None = None
) -> Axes:
    """Draw one rank measure of every layer against epoch, one line per layer.

    Up to 12 layers get a legend; more are coloured by depth with a "layer depth" colour bar.
    Layers without a finite value (NaN/Inf weights throughout) get no line; a note on the axes
    names them.

    Args:
        ranks: the ranks frame (columns layer, epoch and ``column``).
        column: the rank measure: "stable_rank", "effective_rank", "energy_rank", "rank_beta".
        ax: axes to draw on; a new figure is made when None.

    Returns:
        The axes; ``ax.lines`` holds one line per drawn layer in model order.

    Example:
        >>> ax = rank_trajectories(ranks, column="effective_rank")
        >>> ax.get_ylabel()
        'effective rank exp H(p) (directions)'
    """
    _check_frame(ranks, "ranks", ["layer", "epoch"])
    _check_column(ranks, "ranks", "column", column)
    layers = _layer_order(ranks)
    drawable = np.isfinite(ranks[column].to_numpy(float))
    undefined = [name for name in layers if not drawable[(ranks["layer"] == name).to_numpy()].any()]
    ax = _axes(ax)
    depth = ScalarMappable(Normalize(0, max(len(layers) - 1, 1)), plt.get_cmap("viridis"))
    few = len(layers) <= 12
    for j, (layer, one) in enumerate(ranks.groupby("layer", sort=False)):
        if layer in undefined:
            continue
        one = one.sort_values("epoch")
        if few:  # ten distinct colours, then dashed
            style = {"color": f"C{j % 10}", "ls": "-" if j < 10 else "--"}
        else:
            style = {"color": depth.to_rgba(j), "lw": 1.0}
        ax.plot(one["epoch"], one[column], label=str(layer), **style)
    if few and len(undefined) < len(layers):
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", title="layer")
    elif not few:
        ax.figure.colorbar(depth, ax=ax, label="layer depth (0 = first layer)")
    if undefined:
        shown = ", ".join(map(str, undefined[:5])) + (" ..." if len(undefined) > 5 else "")
        ax.text(
            0.02,
            0.98,
            f"not drawn (no finite value): {shown}",
            transform=ax.transAxes,
            va="top",
            fontsize="small",
            gid="undefined",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(RANK_LABELS.get(column, column))
    ax.set_title(f"{column.replace('_', ' ').capitalize()} of each layer over training")
    return ax


def beta_curve(beta_curve: pd.DataFrame, beta: float | None = None, ax: Axes | None = None) -> Axes:
    """Draw the trainable share against the cut-off beta, and the kept energy on a twin axis.

    Args:
        beta_curve: the beta_curve frame (columns beta, trainable_share, optional min_energy and
            mean_energy).
        beta: the chosen cut-off, marked by a vertical line with its trainable share noted.
        ax: axes to draw on; a new figure is made when None.

    Returns:
        The (left) axes.

    Example:
        >>> ax = beta_curve(curve, beta=0.15)
        >>> ax.get_xlabel()
        'cut-off β (keep σ_i ≥ β σ₁)'
    """
    _check_frame(beta_curve, "beta_curve", ["beta", "trainable_share"])
    df = beta_curve.sort_values("beta")
    ax = _axes(ax)
    ax.plot(df["beta"], df["trainable_share"], marker="o", ms=3, label="trainable share")
    ax.set_ylim(0.0, max(1.05 * df["trainable_share"].max(), 0.05))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if beta is not None:
        share = float(np.interp(beta, df["beta"], df["trainable_share"]))
        _mark_x(ax, beta, f"chosen β = {beta:g}", f"β = {beta:g}: {share:.1%} trainable")
        ax.plot([beta], [share], "ko", ms=5)
    axes = [ax]
    energy = [c for c in ("min_energy", "mean_energy") if c in df.columns]
    if energy:
        axes.append(_twin_share(ax, "kept spectral energy Σσ²_kept / Σσ² (%)"))
    for c, ls in zip(energy, ("--", ":")):
        axes[1].plot(df["beta"], df[c], color="C1", ls=ls, label=c.replace("_", " ") + " kept")
    _legend(axes, "center right")
    ax.set_xlabel("cut-off β (keep σ_i ≥ β σ₁)")
    ax.set_ylabel("trainable share of parameters, Σr²/Σmn (%)")
    ax.set_title("Trainable share and kept energy vs cut-off β")
    return ax


# --------------------------------------------------------------------------- output
def save_figure(
    fig: Figure | Axes, path_stem: str | Path, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.<format>`` for each format, then close it.

    PNGs are written at 150 dpi. Missing parent folders are created.

    Args:
        fig: the figure, or any axes on it (what the plot functions return).
        path_stem: the path without extension, e.g. "figures/stability".
        formats: file formats matplotlib can write, e.g. ("png", "svg", "pdf").

    Returns:
        The paths written, in the order of ``formats``.

    Example:
        >>> save_figure(stability_heatmap(stability), "figures/stability")
        [PosixPath('figures/stability.png'), PosixPath('figures/stability.svg')]
    """
    fig = fig.figure if isinstance(fig, Axes) else fig
    supported = fig.canvas.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if not formats or bad:
        wanted = "a non-empty list of " + ", ".join(sorted(supported))
        raise ConfigError(expected("formats", wanted, tuple(formats), "Use e.g. ('png', 'svg')."))
    paths = [Path(f"{path_stem}.{fmt}") for fmt in formats]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths
