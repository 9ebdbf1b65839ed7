"""Plots of the analysis frames: stability heatmaps, network curves, spectra, ranks and beta.

Every function takes one of the tidy frames of :mod:`basis_stability.analysis` (schemas in
SPEC §2-§5), draws on an optional matplotlib ``ax`` and returns the ``Axes`` (``spectra_grid``
returns its ``Figure``). Nothing here reads a file or computes an SVD; :func:`save_figure` is the
only function that writes, and it writes only the figure it is given. Layers are always drawn in
model order, i.e. the order in which they first appear in the frame.

Made for papers: every layer is labelled (the font shrinks and a new figure grows rather than
labels being thinned), with the name :func:`short_names` gives it (the prefix all layers share is
dropped and named once on the axis, never characters cut); epochs are rounded to three significant
digits; legends and line labels sit outside the data.

This module imports matplotlib, so ``basis_stability/__init__.py`` never imports it. It never
chooses a backend either: scripts get matplotlib's default, notebooks keep theirs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Colormap, FuncNorm, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, PercentFormatter

from .errors import ConfigError, expected, positive_int, significant

S_LABEL = "stability S = tr(B_aᵀB_b)/n"
MAX_TICK_LABELS = 25
# Heatmap colours: columns where 1 means "did not move" get the "nines" scale of
# stability_heatmap (linear in -log10(1 - S)); any other column a linear scale over its range.
SETTLED_AT_ONE = ("S", "O_left", "O_right")
S_RESOLVED = 1e-6  # 1 - S below this is round-off (float32 storage, the SVD; see S_err)
UNDEFINED_GREY = "0.72"  # NaN cells: a grey that viridis never takes
LABEL_PTS = (9.0, 4.5)  # largest and smallest font (points) of layer labels
ROW_PITCH = 1.3  # row height per point of label font: labels this far apart never overlap
LINE_STYLES = ("-", "--", ":", "-.")  # with the 20 colours of _line_style: 80 distinct lines
NOTE_PAD = 16.0  # points between an axes and its title: room for a marker's note
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
def check_frame(
    df: object, arg: str, columns: Sequence[str], *, empty_ok: bool = False
) -> pd.DataFrame:
    """Raise a ConfigError unless ``df`` is a DataFrame holding ``columns`` (and, unless
    ``empty_ok``, at least one row); the check of every plotting function's frame."""
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
    if df.empty and not empty_ok:
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


# --------------------------------------------------------------------------- layer names
def _parts(name: str) -> list[str]:
    """``name`` split after each '.' or '/': 'a.b/c' -> ['a.', 'b/', 'c'] (they join back)."""
    return [p for p in re.split(r"(?<=[./])", name) if p]


def common_prefix(names: Sequence[str]) -> str:
    """The leading dotted components all ``names`` share, ending in its separator ('' if none).

    Whole components only, and never a whole name: at least the last component of every name
    stays. With fewer than two names nothing is shared.

    Example:
        >>> common_prefix(["bert.encoder.layer.0.attention.key", "bert.encoder.layer.1.output"])
        'bert.encoder.layer.'
    """
    split = [_parts(str(n)) for n in names]
    if len(split) < 2:
        return ""
    shared = 0
    limit = min(len(parts) for parts in split) - 1
    while shared < limit and len({tuple(parts[: shared + 1]) for parts in split}) == 1:
        shared += 1
    return "".join(split[0][:shared])


def short_names(names: Sequence[str]) -> list[str]:
    """The layer labels of every plot: ``names`` without their :func:`common_prefix`.

    Each label is a suffix of its name, made of whole components, so distinct names keep
    distinct labels; nothing is cut from the right or from inside a component.

    Example:
        >>> short_names(["bert.encoder.layer.0.attention.key", "bert.encoder.layer.1.output"])
        ['0.attention.key', '1.output']
    """
    cut = len(common_prefix(names))
    return [str(n)[cut:] for n in names]


def layer_axis_label(names: Sequence[str], what: str = "layer (model order)") -> str:
    """``what``, plus the prefix :func:`short_names` dropped, if any."""
    prefix = common_prefix(names)
    return f"{what}; prefix {prefix} dropped" if prefix else what


# --------------------------------------------------------------------------- shared helpers
def _fit_title(ax: Axes, parts: Sequence[str]) -> None:
    """Title ``ax`` with ``parts`` joined by '; ', breaking lines between parts until the title
    is no wider than the axes (so it never runs over a colour bar's labels)."""
    for per_line in range(len(parts), 0, -1):
        lines = ["; ".join(parts[i : i + per_line]) for i in range(0, len(parts), per_line)]
        title = ax.set_title("\n".join(lines))
        ax.figure.draw_without_rendering()
        if title.get_window_extent().width <= ax.get_window_extent().width:
            return


def _layer_order(df: pd.DataFrame) -> list[str]:
    """Layers in model order (first appearance in the frame)."""
    return list(pd.unique(df["layer"]))


def new_axes(ax: Axes | None, size: tuple[float, float] = (7.0, 4.0)) -> Axes:
    """Return ``ax``, or the axes of a new constrained-layout figure of ``size`` inches."""
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size, layout="constrained")
    return new


def _label_points(key: str) -> float:
    """Font size, in points, of tick labels set by rcParams ``key`` (e.g. 'ytick.labelsize')."""
    return FontProperties(size=plt.rcParams[key]).get_size_in_points()


def _height_pts(ax: Axes) -> float:
    """The axes' height in points once the figure's layout has run."""
    ax.figure.draw_without_rendering()
    return ax.get_window_extent().height * 72.0 / ax.figure.dpi


def _tick_step(n: int, room_pts: float, label_pts: float) -> int:
    """Show every k-th of ``n`` labels so that each gets ``label_pts`` and at most 25 show."""
    fits = max(1, int(room_pts // label_pts))
    return max(1, math.ceil(n / min(fits, MAX_TICK_LABELS)))


def _thin_epoch_ticks(ax: Axes, labels: Sequence[str]) -> None:
    """Put a tick on every column but a label only on every k-th (epochs: a numeric axis).

    k is chosen from the axes' width in points so that labels never overlap, and so that at
    most 25 show: each label needs ~0.7 font sizes per character.
    """
    ax.figure.draw_without_rendering()
    width = ax.get_window_extent().width * 72.0 / ax.figure.dpi  # points
    font = _label_points("xtick.labelsize")
    step = _tick_step(len(labels), width, (0.7 * max(map(len, labels)) + 1.5) * font)
    shown = np.arange(0, len(labels), step)
    ax.set_xticks(shown, [labels[i] for i in shown])
    ax.set_xticks(np.arange(len(labels)), minor=True)


def _rows_height(n_rows: int, font: float = LABEL_PTS[0]) -> float:
    """Inches ``n_rows`` labelled rows need at ``font`` points."""
    return n_rows * ROW_PITCH * font / 72.0


def _label_rows(ax: Axes, names: Sequence[str]) -> None:
    """Label every row of an image with its short name, in the largest font that fits.

    The font shrinks from 9 to 4.5 points with the rows' height. Only when even 4.5 points do
    not fit (a small axes given by the caller) is every k-th row labelled, and the axis label
    says so.
    """
    labels = short_names(names)
    pitch = _height_pts(ax) / max(len(labels), 1)
    font = min(LABEL_PTS[0], pitch / ROW_PITCH)
    what = "layer (model order)"
    step = 1
    if font < LABEL_PTS[1]:
        font = LABEL_PTS[1]
        step = math.ceil(ROW_PITCH * font / pitch)
        what = f"layer (model order; one label per {step} rows: enlarge the axes for all)"
    shown = np.arange(0, len(labels), step)
    ax.set_yticks(shown, [labels[i] for i in shown], fontsize=font)
    ax.set_yticks(np.arange(len(labels)), minor=True)
    ax.set_ylabel(layer_axis_label(names, what))


def _plain_log(ax: Axes) -> None:
    """Write the ticks of a log y axis spanning under two decades as plain numbers (60, 0.2),
    not as 6×10¹; wider spans keep matplotlib's powers of ten."""
    lo, hi = ax.get_ylim()
    if lo <= 0 or hi / lo >= 100:
        return
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: significant(value, 2)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: _minor_label(value, lo, hi)))


def _minor_label(value: float, lo: float, hi: float) -> str:
    """Label minor log ticks 2x and 5x (all of them within one decade), as plain numbers."""
    lead = round(value / 10.0 ** math.floor(math.log10(value)), 6)
    return significant(value, 2) if hi / lo < 10 or lead in (2.0, 5.0) else ""


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


def _nines_norm(values: np.ndarray) -> FuncNorm:
    """The heatmap's colour scale for S: linear in -log10(1 - S), from the lowest S to the top.

    Its top is 1 - 10^-k for the largest power of ten at or below the smallest 1 - S shown
    that exceeds 1e-6, the resolution of S (k between 3 and 6); its bottom the lowest S shown,
    or one decade below the top if that is lower (so 0.99 is always on the bar). The data fills
    the bar. S above the top (1.0 itself, or round-off beyond it) takes the top colour, which
    the colour bar marks with '≥'.
    """
    finite = values[np.isfinite(values)]
    resolved = (1.0 - finite)[1.0 - finite > S_RESOLVED]
    smallest = float(resolved.min()) if resolved.size else S_RESOLVED
    floor = min(max(10.0 ** math.floor(math.log10(smallest) + 1e-9), S_RESOLVED), 1e-3)
    bottom = min(float(finite.min()) if finite.size else 1.0, 1.0 - 10.0 * floor)

    def forward(x):
        return -np.log10(np.clip(1.0 - np.asarray(x, float), floor, None))

    def inverse(y):
        return 1.0 - 10.0 ** -np.asarray(y, float)

    return FuncNorm((forward, inverse), vmin=bottom, vmax=1.0 - floor)


def _nines_ticks(norm: Normalize, saturated: bool) -> tuple[list[float], list[str]]:
    """Colour-bar ticks 0.9, 0.99, 0.999, ... (and 0, -1, the bottom) within the norm's range."""
    top = round(-math.log10(1.0 - norm.vmax))
    ticks = {1.0 - 10.0**-k: f"{1.0 - 10.0**-k:.{k}f}" for k in range(1, top + 1)}
    ticks.update({t: f"{t:g}" for t in (0.0, -1.0) if t >= norm.vmin})
    decades = top + math.log10(1.0 - norm.vmin)  # the bar's length in decades of 1 - S
    # the bottom (the lowest S) when it is a quarter decade from every other tick
    if all(abs(float(norm(norm.vmin)) - float(norm(t))) * decades > 0.25 for t in ticks):
        ticks[norm.vmin] = significant(norm.vmin, 2)
    order = sorted(ticks)
    labels = [ticks[t] for t in order]
    if saturated:
        labels[-1] = "≥ " + labels[-1]  # the top tick is the top of the bar
    return order, labels


def _tau_outline(ax: Axes, stable: np.ndarray, tau: float) -> None:
    """Draw the cell edges between S ≥ tau and S < tau (or undefined) as one white line set."""
    edges = []
    rows, cols = stable.shape
    for i, j in zip(*np.nonzero(stable[:, 1:] != stable[:, :-1])):  # left/right neighbours
        edges.append([(j + 0.5, i - 0.5), (j + 0.5, i + 0.5)])
    for i, j in zip(*np.nonzero(stable[1:, :] != stable[:-1, :])):  # upper/lower neighbours
        edges.append([(j - 0.5, i + 0.5), (j + 0.5, i + 0.5)])
    line = LineCollection(
        edges, colors="white", linewidths=1.6, gid="tau", label=f"S = τ = {tau:g}"
    )
    ax.add_collection(line, autolim=False)


def _heatmap_colours(values: np.ndarray, value: str) -> tuple[Normalize, list, list]:
    """The norm of a column and its colour-bar ticks and labels (nines for S-like columns)."""
    if value in SETTLED_AT_ONE:
        norm = _nines_norm(values)
        saturated = bool(np.any(values[np.isfinite(values)] > norm.vmax))
        return (norm, *_nines_ticks(norm, saturated))
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return Normalize(lo, hi if hi > lo else lo + 1.0), None, None


def _heatmap_notes(ax: Axes, bar, values: np.ndarray, value: str, tau: float | None) -> list:
    """Draw the tau outline (on the image and the bar) and say in words what the colours mean."""
    notes = []
    if value in SETTLED_AT_ONE:
        notes.append("colour: log scale of 1 − S")
        if tau is not None:
            _tau_outline(ax, np.nan_to_num(values, nan=-np.inf) >= tau, tau)
            bar.ax.axhline(tau, color="white", lw=1.6)
            notes.append(f"white line: τ = {tau:g}")
    if np.isnan(values).any():
        notes.append("grey = undefined")
    return notes


def _epoch_axis_label(epochs: np.ndarray) -> str:
    """The heatmap's x label; it warns when the columns are not evenly spaced in time (a
    step or log schedule), since every snapshot gets one column of the same width."""
    gaps = np.diff(epochs)
    even = gaps.size < 2 or bool(np.allclose(gaps, gaps[0], rtol=0.01))
    return "epoch (of the later snapshot b)" + (
        "" if even else ": one column per snapshot, unevenly spaced"
    )


def _heatmap_size(table: pd.DataFrame) -> tuple[float, float]:
    """Inches of a new heatmap figure: room for every layer label at 9 pt, up to 30 inches."""
    n_layers, n_epochs = table.shape
    label = 0.6 * LABEL_PTS[0] * max(len(n) for n in short_names(list(table.index))) / 72
    width = min(4.0 + 0.3 * n_epochs, 14.0) + label
    return width, min(max(3.0, 1.6 + _rows_height(n_layers)), 30.0)


def stability_heatmap(
    stability: pd.DataFrame,
    pair: str = "lag",
    value: str = "S",
    ax: Axes | None = None,
    tau: float | None = None,
) -> Axes:
    """Draw a layer x epoch heatmap of the stability of one pair kind (the paper's figure).

    Rows are layers in model order, every one labelled by its short name (:func:`short_names`);
    columns the epoch of the later snapshot b.

    The colour scale of S (and of O_left, O_right) is linear in -log10(1 - S), labelled in S:
    0.9, 0.99, 0.999 and 0.9999 are equally far apart, bright = settled. S bunches near 1: on
    the default run every layer passes 0.97 early, so a linear (or two-slope) scale paints
    everything that matters one yellow, while the question the plot answers, "when does each
    layer cross tau = 0.99?", is a question about the second nine. A sequential map over
    [S_min, 1] would still give 0.99-1 a sliver. The bar runs from the lowest S shown to
    1 - 10^-k just below the highest (S of 1 - 1e-6 and above is round-off, and takes the top
    colour, marked '≥' on the bar). With ``tau``, a white line outlines the cells with S ≥ tau
    and marks tau on the bar. Other columns get a linear scale over their range.

    Undefined values (NaN: no partner snapshot, a basis that is not unique, NaN weights) are
    light grey, a colour viridis never takes; the title says so when there are any.

    Args:
        stability: the stability frame (columns layer, pair, epoch_b and ``value``).
        pair: which pair kind to show: "lag", "consecutive", "final" or "initial".
        value: the column coloured, e.g. "S", "O_left" or "O_right".
        ax: axes to draw on; a new figure, sized for every layer label, is made when None.
        tau: the stability threshold to outline (the plan's ``rules["delay"]["tau"]``).

    Returns:
        The axes, with the image (the values, unchanged) in ``ax.images[0]`` and its colour bar.

    Example:
        >>> ax = stability_heatmap(stability, pair="lag", tau=0.99)
        >>> ax.images[0].get_array().shape  # (layers, epochs)
        (3, 5)
    """
    check_frame(stability, "stability", ["layer", "pair", "epoch_b"])
    _check_column(stability, "stability", "value", value)
    table = _stability_matrix(stability, pair, value)
    values = table.to_numpy(float)  # (layers, epochs)
    ax = new_axes(ax, _heatmap_size(table))
    norm, ticks, tick_labels = _heatmap_colours(values, value)
    cmap: Colormap = plt.get_cmap("viridis").with_extremes(bad=UNDEFINED_GREY)
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    words = _pair_words(stability, pair)
    name = "stability S" if value == "S" else value
    bar = ax.figure.colorbar(image, ax=ax, ticks=ticks)
    if tick_labels is not None:
        bar.set_ticklabels(tick_labels)
    bar.set_label(f"{name} ({words})")
    notes = [f"{name}, {words}", *_heatmap_notes(ax, bar, values, value, tau)]
    _fit_title(ax, ["Per-layer " + notes[0], *notes[1:]])
    _thin_epoch_ticks(ax, [significant(epoch) for epoch in table.columns])
    ax.set_xlabel(_epoch_axis_label(np.asarray(table.columns, float)))
    _label_rows(ax, [str(layer) for layer in table.index])
    return ax


def mean_stability(
    network: pd.DataFrame,
    delay_epoch: float | None = None,
    tau: float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Draw the network-level stability curves, the chosen delay and the threshold tau.

    Plots mean_S and weighted_S against epoch; stable_share (when present) is a dashed line on
    a twin axis at the right. On a new figure the legend sits outside the axes, at the right; on
    a given ``ax`` it goes where it covers the fewest points (matplotlib's "best").

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
    check_frame(network, "network", ["epoch", "mean_S", "weighted_S"])
    df = network.sort_values("epoch")
    own_figure = ax is None
    ax = new_axes(ax, (8.5, 4.0))  # wide enough for the legend at the right
    ax.plot(df["epoch"], df["mean_S"], marker="o", ms=3, label="mean S over layers")
    ax.plot(df["epoch"], df["weighted_S"], marker="s", ms=3, label="mean S weighted by m·n")
    if tau is not None:
        ax.axhline(tau, color="0.4", ls="--", lw=1, label=f"threshold τ = {tau:g}")
    if delay_epoch is not None:
        epoch = significant(delay_epoch)
        _mark_x(ax, delay_epoch, f"delay d = epoch {epoch}", f"delay d = {epoch}")
    axes = [ax]
    if "stable_share" in df.columns and df["stable_share"].notna().any():
        axes.append(_twin_share(ax, "parameter share of layers with S ≥ τ (%)"))
        axes[1].plot(df["epoch"], df["stable_share"], color="C2", ls="--", label="stable share")
    _legend(axes, own_figure)
    ax.set_xlabel("epoch")
    ax.set_ylabel(S_LABEL)
    ax.set_title("Network-level basis stability", pad=NOTE_PAD)
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


def _legend(axes: Sequence[Axes], own_figure: bool) -> None:
    """One legend for the labelled series of all ``axes``, off the data: outside at the right
    of a figure this module made (constrained layout leaves it room), else where it covers the
    fewest points of the first axes."""
    pairs = [each.get_legend_handles_labels() for each in axes]
    handles = [h for hs, _ in pairs for h in hs]
    labels = [label for _, ls in pairs for label in ls]
    if own_figure:
        axes[0].figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    else:
        axes[0].legend(handles, labels, loc="best", fontsize="small")


def _mark_x(ax: Axes, x: float, label: str, note: str) -> None:
    """Vertical line at ``x`` (gid 'marker') with a note just above the axes, off the data
    (the caller's title leaves it room: ``pad=NOTE_PAD``)."""
    ax.axvline(x, color="k", ls=":", lw=1.2, label=label, gid="marker")
    lo, hi = ax.get_xlim()
    where = (x - lo) / (hi - lo)
    ax.annotate(
        note,
        xy=(x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(0, 3),
        textcoords="offset points",
        ha="left" if where < 0.2 else "right" if where > 0.8 else "center",
        va="bottom",
        fontsize="small",
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
    check_frame(spectra, "spectra", ["layer", "snapshot", "epoch", "i", column])
    _check_layer(spectra, "layer", layer)
    one = spectra[spectra["layer"] == layer]
    ax = new_axes(ax)
    colours = _epoch_colours(one["epoch"].to_numpy())
    _draw_spectrum(ax, one, colours, column)
    ax.figure.colorbar(colours, ax=ax, label="epoch")
    if log:
        ax.set_yscale("log")
        _plain_log(ax)
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


def _wrapped(label: str, width: int = 30) -> str:
    """``label`` broken into lines of about ``width`` characters after a '.' or '/' (never inside
    a component), for panel titles."""
    lines = [""]
    for part in _parts(label):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


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
        The figure; panel titles are the :func:`short_names` of the drawn layers, broken
        after a '.' when long (the suptitle names the dropped prefix).

    Example:
        >>> fig = spectra_grid(spectra, max_layers=9)
        >>> save_figure(fig, "out/spectra")
        [PosixPath('out/spectra.png'), PosixPath('out/spectra.svg')]
    """
    column = "sigma_rel" if relative else "sigma"
    check_frame(spectra, "spectra", ["layer", "snapshot", "epoch", "i", column])
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
    titles = short_names(chosen)
    for n, (ax, layer, title) in enumerate(zip(grid.flat, chosen, titles)):
        _draw_spectrum(ax, spectra[spectra["layer"] == layer], colours, column)
        ax.set_yscale("log")
        ax.set_title(_wrapped(title), fontsize="small")
        ax.set_xlabel("index i" if n + ncols >= len(chosen) else "")
    for ax in grid.flat[: len(chosen)]:
        _plain_log(ax)  # after all panels: with sharey the limits are the shared ones
    for ax in grid.flat[len(chosen) :]:
        ax.set_visible(False)
    fig.colorbar(colours, ax=grid.flat[: len(chosen)], label="epoch")
    fig.supylabel(_sigma_label(relative))  # once: a label per row would outgrow its panels
    fig.suptitle(_grid_title(chosen, len(wanted), relative))
    return fig


def _grid_title(chosen: Sequence[str], wanted: int, relative: bool) -> str:
    kind = "relative singular values σ_i / σ₁" if relative else "singular values σ"
    note = f"all {len(chosen)} layers"
    if len(chosen) < wanted:
        note = f"{len(chosen)} of {wanted} layers, evenly spaced"
    prefix = common_prefix(chosen)
    dropped = f"; panels named after {prefix}" if prefix else ""
    return f"Spectra over training: {kind} ({note}{dropped})"


# --------------------------------------------------------------------------- ranks and beta
def _spread(targets: Sequence[float], gap: float) -> np.ndarray:
    """Label heights (axes fraction) closest to ``targets`` with at least ``gap`` between any
    two, inside [0, 1] when they fit there, centred on 0.5 when they do not."""
    order = np.argsort(targets, kind="stable")
    pos = np.clip(np.asarray(targets, float)[order], 0.0, 1.0)
    for i in range(1, len(pos)):  # push up
        pos[i] = max(pos[i], pos[i - 1] + gap)
    if len(pos):
        pos[-1] = min(pos[-1], 1.0)
    for i in range(len(pos) - 2, -1, -1):  # then down from the top
        pos[i] = min(pos[i], pos[i + 1] - gap)
    if len(pos) and pos[0] < 0.0:  # more labels than fit: evenly spaced, centred
        pos = 0.5 + gap * (np.arange(len(pos)) - (len(pos) - 1) / 2)
    out = np.empty_like(pos)
    out[order] = pos
    return out


def _line_style(j: int) -> tuple[tuple[float, ...], str]:
    """Colour and dash of the j-th line: the ten default colours, their ten light partners of
    tab20, then the same dashed, dotted and dash-dotted: 80 lines that all look different."""
    colour = j % 20
    pair = plt.get_cmap("tab20")(2 * (colour - 10) + 1) if colour >= 10 else f"C{colour}"
    return to_rgba(pair), LINE_STYLES[j // 20 % len(LINE_STYLES)]


def _end_labels(ax: Axes, ends: list[tuple[str, float, float, str]], missing: list[str]) -> None:
    """Name each line at its right end, in its colour, in a column outside the axes.

    ``ends`` holds (label, x, y, colour) of each line's last finite point; ``missing`` the
    labels of layers without a line, listed (grey, gid 'undefined') at the bottom of the column.
    Labels are spread so that no two overlap, each joined to its line end by a thin leader.
    """
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi)  # fixed: the labels' heights are fractions of this range
    height = _height_pts(ax)
    count = len(ends) + len(missing)
    font = max(min(8.0, height / max(count, 1) / ROW_PITCH), LABEL_PTS[1])
    targets = [(y - lo) / (hi - lo) for _, _, y, _ in ends] + [-1.0] * len(missing)
    heights = _spread(targets, ROW_PITCH * font / height)
    for (label, x, y, colour), at in zip(ends, heights):
        ax.annotate(
            label,
            xy=(x, y),
            xytext=(1.03, at),
            textcoords="axes fraction",
            color=colour,
            fontsize=font,
            va="center",
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5, "shrinkA": 1, "shrinkB": 2},
        )
    for label, at in zip(missing, heights[len(ends) :]):
        ax.text(
            1.03,
            at,
            f"{label}: no finite value",
            transform=ax.transAxes,
            color="0.4",
            fontsize=font,
            va="center",
            gid="undefined",
        )


def rank_trajectories(
    ranks: pd.DataFrame, column: str = "stable_rank", ax: Axes | None = None
) -> Axes:
    """Draw one rank measure of every layer against epoch, one line per layer.

    Every line is named at its right end by its short name (:func:`short_names`), in its
    colour, in a column outside the axes where labels are spread so none overlap (a new figure
    grows with the number of layers). Lines cycle through the ten default colours, then
    dashed, dotted and dash-dotted. Layers without a finite value (NaN/Inf weights throughout)
    get no line; the label column names them, in grey, at its bottom.

    Args:
        ranks: the ranks frame (columns layer, epoch and ``column``).
        column: the rank measure: "stable_rank", "effective_rank", "energy_rank", "rank_beta".
        ax: axes to draw on; a new figure is made when None.

    Returns:
        The axes; ``ax.lines`` holds one line per drawn layer in model order, ``ax.texts`` the
        labels.

    Example:
        >>> ax = rank_trajectories(ranks, column="effective_rank")
        >>> ax.get_ylabel()
        'effective rank exp H(p) (directions)'
    """
    check_frame(ranks, "ranks", ["layer", "epoch"])
    _check_column(ranks, "ranks", "column", column)
    layers = _layer_order(ranks)
    labels = dict(zip(layers, short_names([str(n) for n in layers])))
    ax = new_axes(ax, (7.5, max(4.0, 1.4 + _rows_height(len(layers), 8.0))))
    ends, missing = [], []
    for j, (layer, one) in enumerate(ranks.groupby("layer", sort=False)):
        one = one.sort_values("epoch")
        values = one[column].to_numpy(float)
        finite = np.nonzero(np.isfinite(values))[0]
        if not finite.size:
            missing.append(labels[layer])
            continue
        colour, style = _line_style(j)
        ax.plot(one["epoch"], values, color=colour, ls=style, label=str(layer))
        ends.append(
            (labels[layer], float(one["epoch"].iloc[finite[-1]]), values[finite[-1]], colour)
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(RANK_LABELS.get(column, column))
    title = f"{column.replace('_', ' ').capitalize()} of each layer over training"
    prefix = common_prefix([str(n) for n in layers])
    ax.set_title(title + (f"\n(layers named after {prefix})" if prefix else ""))
    _end_labels(ax, ends, missing)
    return ax


def beta_curve(beta_curve: pd.DataFrame, beta: float | None = None, ax: Axes | None = None) -> Axes:
    """Draw the trainable share against the cut-off beta, and the kept energy on a twin axis.

    The legend sits outside the axes on a new figure (see :func:`mean_stability`).

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
    check_frame(beta_curve, "beta_curve", ["beta", "trainable_share"])
    df = beta_curve.sort_values("beta")
    own_figure = ax is None
    ax = new_axes(ax, (8.5, 4.0))  # wide enough for the legend at the right
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
    _legend(axes, own_figure)
    ax.set_xlabel("cut-off β (keep σ_i ≥ β σ₁)")
    ax.set_ylabel("trainable share of parameters, Σr²/Σmn (%)")
    ax.set_title("Trainable share and kept energy vs cut-off β", pad=NOTE_PAD)
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
