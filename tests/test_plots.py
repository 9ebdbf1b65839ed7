"""Plots of the analysis frames: each figure shows exactly the numbers it was given."""

from __future__ import annotations

import itertools
import subprocess
import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from basis_stability import plots
from basis_stability.errors import ConfigError, significant

matplotlib.use("Agg")  # tests only: the library never picks a backend

LAYERS = ["fc2", "conv", "attn"]  # model order, deliberately not alphabetical


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def stability_frame(layers: list[str], n_snaps: int = 6, lag: int = 2) -> pd.DataFrame:
    """'lag' rows plus 'consecutive' rows, epoch-major so that layer order is first appearance."""
    rng = np.random.default_rng(0)
    rows = []
    for pair, gap in (("lag", lag), ("consecutive", 1)):
        for b in range(gap, n_snaps):
            for name in layers:
                rows.append(
                    {
                        "layer": name,
                        "kind": "Linear",
                        "pair": pair,
                        "lag": gap,
                        "a": b - gap,
                        "b": b,
                        "epoch_a": 5.0 * (b - gap),
                        "epoch_b": 5.0 * b,
                        "step_a": 0,
                        "step_b": 0,
                        "S": rng.uniform(0.5, 1.0),
                        "O_left": rng.uniform(0.5, 1.0),
                        "O_right": 0.9,
                        "k": 4,
                        "reason": None,
                    }
                )
    return pd.DataFrame(rows)


def network_frame() -> pd.DataFrame:
    epoch = np.arange(1, 11) * 5.0
    return pd.DataFrame(
        {
            "snapshot": range(10),
            "epoch": epoch,
            "step": 100 * np.arange(10),
            "mean_S": 1 - 0.3 * np.exp(-epoch / 10),
            "weighted_S": 1 - 0.4 * np.exp(-epoch / 10),
            "stable_share": np.clip(epoch / 40, 0, 1),
        }
    )


def spectra_frame(layers: list[str], n_snaps: int = 6, n: int = 5) -> pd.DataFrame:
    rows = []
    for name, t in itertools.product(layers, range(n_snaps)):
        sigma = (t + 1.0) * np.exp(-np.arange(n) * (1 + t / 3))
        for i, s in enumerate(sigma, start=1):
            rows.append(
                {
                    "layer": name,
                    "snapshot": t,
                    "epoch": 10.0 * t,
                    "step": 100 * t,
                    "i": i,
                    "sigma": s,
                    "sigma_rel": s / sigma[0],
                }
            )
    return pd.DataFrame(rows)


def ranks_frame(layers: list[str], n_snaps: int = 6) -> pd.DataFrame:
    rows = [
        {
            "layer": name,
            "kind": "Linear",
            "snapshot": t,
            "epoch": 10.0 * t,
            "step": 100 * t,
            "m": 8,
            "n": 4,
            "stable_rank": 4.0 - t / 3 + j,
            "effective_rank": 3.0,
            "energy_rank": 3,
            "rank_beta": 2,
        }
        for t in range(n_snaps)
        for j, name in enumerate(layers)
    ]
    return pd.DataFrame(rows)


def beta_frame() -> pd.DataFrame:
    beta = np.linspace(0.05, 0.5, 10)
    return pd.DataFrame(
        {
            "beta": beta,
            "trainable_share": np.exp(-5 * beta),
            "min_energy": 1 - beta,
            "mean_energy": 1 - beta / 2,
        }
    )


def _twin(ax):
    """The twin axes sharing x with ``ax``."""
    return next(o for o in ax.figure.axes if o is not ax and ax.get_shared_x_axes().joined(ax, o))


def _marker_x(ax) -> float:
    (line,) = [line for line in ax.lines if line.get_gid() == "marker"]
    xs = np.unique(line.get_xdata())
    assert xs.size == 1
    return float(xs[0])


def _shown_ticks(axis) -> tuple[list, list]:
    """(labels of the ticks inside the view, labels of all ticks) of one axis."""
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
    shown, every = [], []
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
        labels = [tick.label1, tick.label2]
        every += labels
        if lo - slack <= tick.get_loc() <= hi + slack:
            shown += labels
    return shown, every


def _texts(fig) -> list:
    """Every text a drawn figure shows (tick labels in view, titles, notes, legends)."""
    fig.canvas.draw()
    shown, ticks = [], set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            inside, every = _shown_ticks(axis)
            shown += inside
            ticks.update(map(id, every))
    shown += [t for t in fig.findobj(Text) if id(t) not in ticks]
    return [t for t in shown if t.get_visible() and t.get_text().strip()]


def _box(text):
    """The box of the text itself (an annotation's extent would include its leader line)."""
    return Text.get_window_extent(text)


def assert_no_overlapping_text(fig) -> None:
    boxes = [(t.get_text(), _box(t)) for t in _texts(fig)]
    clash = [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if box_a.overlaps(box_b)
    ]
    assert not clash, clash[:5]


def bert_names(n_blocks: int = 2) -> list[str]:
    """Hugging Face BERT's names of the recorded matrices of ``n_blocks`` encoder blocks."""
    parts = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
        "output.dense_2",  # a seventh, so two blocks give the 14 layers
    ]
    return [f"bert.encoder.layer.{i}.{part}" for i in range(n_blocks) for part in parts]


# --------------------------------------------------------------------------- heatmap
def test_heatmap_image_is_the_pivoted_values_in_model_order():
    frame = stability_frame(LAYERS)
    ax = plots.stability_heatmap(frame, pair="lag")
    lag = frame[frame.pair == "lag"]
    want = lag.pivot(index="layer", columns="epoch_b", values="S").loc[LAYERS]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), want.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "15", "20", "25"]
    assert ax.images[0].colorbar.ax.get_ylabel() == "stability S (lag 2)"
    assert ax.get_title() and ax.get_xlabel().startswith("epoch")


def test_heatmap_other_pair_and_value_and_nan_cells():
    frame = stability_frame(LAYERS)
    frame.loc[(frame.pair == "consecutive") & (frame.layer == "conv"), "O_left"] = np.nan
    ax = plots.stability_heatmap(frame, pair="consecutive", value="O_left")
    image = ax.images[0].get_array()
    assert image.shape == (3, 5)
    assert np.ma.getmaskarray(image)[1].all() and not np.ma.getmaskarray(image)[[0, 2]].any()
    assert ax.images[0].colorbar.ax.get_ylabel() == "O_left (consecutive snapshots)"
    assert "grey = undefined" in ax.get_title()


def test_heatmap_with_60_layers_labels_every_row_without_overlap():
    layers = [f"encoder.layers.{j}.self_attn.out_proj" for j in range(60)]
    ax = plots.stability_heatmap(stability_frame(layers, n_snaps=40))
    fig = ax.figure
    assert fig.get_figheight() > 8  # grew with the number of layers
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"{j}.self_attn.out_proj" for j in range(60)
    ]
    assert "encoder.layers." in ax.get_ylabel()  # the dropped prefix is named once
    assert list(ax.get_yticks()) == list(range(60))
    assert_no_overlapping_text(fig)
    shown = [t for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(shown) <= 25  # epochs, a numeric axis, may be thinned


def test_heatmap_on_a_given_small_axes_shrinks_the_font_then_says_it_thins():
    fig, ax = plt.subplots(figsize=(4, 6))
    out = plots.stability_heatmap(stability_frame([f"l{j}" for j in range(30)]), ax=ax)
    assert out is ax and fig.get_figheight() == 6  # the caller's figure keeps its size
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"l{j}" for j in range(30)]
    assert ax.get_yticklabels()[0].get_fontsize() < 9  # shrunk to fit
    assert_no_overlapping_text(fig)
    fig, ax = plt.subplots(figsize=(4, 2))  # not even 4.5 pt fit: thinned, and said so
    plots.stability_heatmap(stability_frame([f"l{j}" for j in range(30)]), ax=ax)
    assert len(ax.get_yticklabels()) < 30 and "enlarge the axes" in ax.get_ylabel()
    boxes = [t.get_window_extent() for t in _texts(fig) if t in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_heatmap_of_bert_layers_labels_each_by_its_distinct_part():
    names = bert_names()
    ax = plots.stability_heatmap(stability_frame(names), tau=0.99)
    want = [name.removeprefix("bert.encoder.layer.") for name in names]  # 14 rows, none cut
    assert [t.get_text() for t in ax.get_yticklabels()] == want
    assert_no_overlapping_text(ax.figure)


def test_heatmap_colour_scale_is_even_in_nines_and_covers_the_data():
    frame = stability_frame(LAYERS)
    lag = frame.index[frame.pair == "lag"]
    frame.loc[lag, "S"] = 0.95
    frame.loc[lag[:3], "S"] = [0.6, 1.0, 0.99997]
    ax = plots.stability_heatmap(frame)
    image = ax.images[0]
    data = np.ma.getdata(image.get_array())[np.isfinite(np.ma.getdata(image.get_array()))]
    norm = image.norm
    assert norm.vmin <= data.min() == 0.6
    assert norm.vmax == pytest.approx(1 - 1e-5)  # the smallest 1 - S below 1 is 3e-5
    shades = np.asarray(norm(data))
    assert shades.min() >= 0.0 and shades.max() <= 1.0  # every value inside the colour range
    assert norm(1.0) == 1.0  # S = 1 exactly takes the top colour
    nines = np.asarray(norm([0.9, 0.99, 0.999, 0.9999]))
    np.testing.assert_allclose(np.diff(nines), np.diff(nines)[0])  # equal steps per nine
    # an independent formula: position = log10((1 - vmin) / (1 - S)) / log10((1 - vmin) / 1e-5)
    want = np.log10(0.4 / (1 - 0.99)) / np.log10(0.4 / 1e-5)
    assert float(norm(0.99)) == pytest.approx(want)
    labels = [t.get_text() for t in image.colorbar.ax.get_yticklabels()]
    assert labels == ["0.6", "0.9", "0.99", "0.999", "0.9999", "≥ 0.99999"]


def test_heatmap_nan_cells_are_grey_not_a_colour_of_the_scale():
    frame = stability_frame(LAYERS)
    frame.loc[(frame.pair == "lag") & (frame.layer == "conv"), "S"] = np.nan
    ax = plots.stability_heatmap(frame)
    image = ax.images[0]
    grey = image.cmap.get_bad()
    assert np.allclose(grey[:3], grey[0])  # a grey
    scale = image.cmap(np.linspace(0, 1, 256))[:, :3]
    assert np.abs(scale - grey[:3]).sum(axis=1).min() > 0.2  # far from every colour of the map
    assert "grey = undefined" in ax.get_title()


def test_heatmap_tau_line_runs_between_stable_and_unstable_cells():
    rows = [
        {"layer": layer, "pair": "lag", "epoch_b": float(e), "S": s}
        for layer, values in (("a", [0.9, 0.995, 0.999]), ("b", [0.9, 0.95, 0.999]))
        for e, s in enumerate(values)
    ]
    ax = plots.stability_heatmap(pd.DataFrame(rows), tau=0.99)
    (outline,) = [c for c in ax.collections if c.get_gid() == "tau"]
    got = {tuple(map(tuple, np.round(seg, 6))) for seg in outline.get_segments()}
    # a: unstable | stable stable; b: unstable unstable | stable; a/b differ in column 1
    want = {
        ((0.5, -0.5), (0.5, 0.5)),  # a, between columns 0 and 1
        ((1.5, 0.5), (1.5, 1.5)),  # b, between columns 1 and 2
        ((0.5, 0.5), (1.5, 0.5)),  # column 1, between a and b
    }
    assert got == want
    assert "τ = 0.99" in ax.get_title()


def test_heatmap_epochs_are_rounded():
    frame = stability_frame(LAYERS, n_snaps=4)
    frame["epoch_b"] = frame["epoch_b"] * 40 / 55  # 40 epochs over 11 snapshots: 3.63636...
    ax = plots.stability_heatmap(frame)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["7.27", "10.9"]
    assert ax.get_xlabel() == "epoch (of the later snapshot b)"  # evenly spaced
    frame = stability_frame(LAYERS, n_snaps=6)
    frame["epoch_b"] = 2.0 ** frame["b"]  # a log schedule: the label says columns are uneven
    assert "unevenly spaced" in plots.stability_heatmap(frame).get_xlabel()


def test_heatmap_rejects_unknown_pair_and_duplicate_rows():
    frame = stability_frame(LAYERS)
    with pytest.raises(ConfigError, match=r"`pair`.*'final'.*lag, consecutive"):
        plots.stability_heatmap(frame, pair="final")
    two_lags = pd.concat([frame, frame[frame.pair == "lag"].assign(lag=3)])
    with pytest.raises(ConfigError, match=r"one 'lag' row per \(layer, epoch_b\).*lag == 5"):
        plots.stability_heatmap(two_lags)


# --------------------------------------------------------------------------- network curve
def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend() or ax.figure.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def assert_legend_off_the_axes(ax) -> None:
    fig = ax.figure
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert not any(box.overlaps(each.get_window_extent()) for each in fig.axes)


def test_mean_stability_marks_delay_and_tau_and_plots_the_curves():
    net = network_frame()
    ax = plots.mean_stability(net, delay_epoch=25.0, tau=0.95)
    assert _marker_x(ax) == 25.0
    (tau_line,) = [line for line in ax.lines if "τ" in line.get_label()]
    assert set(tau_line.get_ydata()) == {0.95}
    np.testing.assert_allclose(ax.lines[0].get_ydata(), net.mean_S)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), net.weighted_S)
    assert any(t.get_text() == "delay d = 25" for t in ax.texts)
    np.testing.assert_allclose(_twin(ax).lines[0].get_ydata(), net.stable_share)
    legend = _legend_texts(ax)
    assert len(legend) == 5 and "stable share" in legend
    assert ax.get_ylabel() == "stability S = tr(B_aᵀB_b)/n" and ax.get_xlabel() == "epoch"
    assert_legend_off_the_axes(ax)
    assert_no_overlapping_text(ax.figure)


def test_mean_stability_rounds_a_fractional_delay_and_keeps_the_note_off_the_data():
    ax = plots.mean_stability(network_frame(), delay_epoch=40 / 11, tau=0.99)
    (note,) = ax.texts
    assert note.get_text() == "delay d = 3.64"
    assert "delay d = epoch 3.64" in _legend_texts(ax)
    ax.figure.canvas.draw()
    assert note.get_window_extent().y0 >= ax.get_window_extent().y1 - 1  # above the axes
    assert_no_overlapping_text(ax.figure)


def test_mean_stability_on_a_given_axes_puts_the_legend_where_it_fits():
    fig, ax = plt.subplots()
    plots.mean_stability(network_frame(), ax=ax)
    assert ax.get_legend() is not None and not fig.legends
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    points = np.vstack([ax.transData.transform(line.get_xydata()) for line in ax.lines[:2]])
    assert not box.count_contains(points)  # no point of the two curves under the legend


def test_mean_stability_without_share_delay_or_tau():
    ax = plots.mean_stability(network_frame().drop(columns="stable_share"))
    assert len(ax.lines) == 2 and len(ax.figure.axes) == 1 and not ax.texts


# --------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("relative", [False, True])
def test_spectrum_draws_one_line_per_snapshot_with_its_values(relative):
    frame = spectra_frame(LAYERS)
    ax = plots.spectrum(frame, "conv", relative=relative)
    column = "sigma_rel" if relative else "sigma"
    one = frame[frame.layer == "conv"]
    assert len(ax.lines) == one.snapshot.nunique()
    for line, (_, snap) in zip(ax.lines, one.groupby("snapshot")):
        np.testing.assert_allclose(line.get_xdata(), snap.i)
        np.testing.assert_allclose(line.get_ydata(), snap[column])
    assert ax.get_yscale() == "log"
    assert ax.figure.axes[-1].get_ylabel() == "epoch"  # the colour bar
    colours = [line.get_color() for line in ax.lines]
    assert colours[0] != colours[-1]  # coloured by epoch


def test_spectrum_linear_scale_and_unknown_layer():
    assert plots.spectrum(spectra_frame(LAYERS), "fc2", log=False).get_yscale() == "linear"
    with pytest.raises(ConfigError, match=r"`layer`.*'fc9'.*Known layers: fc2, conv, attn"):
        plots.spectrum(spectra_frame(LAYERS), "fc9")


def test_spectra_grid_picks_max_layers_evenly_with_one_colour_bar():
    layers = [f"block{j}" for j in range(60)]
    fig = plots.spectra_grid(spectra_frame(layers, n_snaps=3, n=3), max_layers=16)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles = [ax.get_title() for ax in panels]
    assert len(panels) == 16
    assert titles[0] == "block0" and titles[-1] == "block59"
    assert titles == [f"block{j}" for j in np.round(np.linspace(0, 59, 16)).astype(int)]
    assert all(len(ax.lines) == 3 for ax in panels)
    assert "16 of 60 layers" in fig.get_suptitle()
    assert [ax.get_ylabel() for ax in fig.axes if not ax.get_title()] == ["epoch"]


def test_spectra_grid_all_given_layers_hides_spare_panels():
    fig = plots.spectra_grid(spectra_frame(LAYERS), layers=["attn", "fc2", "conv"], relative=False)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["attn", "fc2", "conv"]
    assert sum(not ax.get_visible() for ax in fig.axes) == 1  # 2 x 2 grid, one spare
    assert "all 3 layers" in fig.get_suptitle()
    with pytest.raises(ConfigError, match="`layers`.*'nope'"):
        plots.spectra_grid(spectra_frame(LAYERS), layers=["nope"])


def test_spectra_grid_titles_drop_the_common_prefix_and_cut_no_characters():
    names = bert_names()
    fig = plots.spectra_grid(spectra_frame(names, n_snaps=2, n=3))
    titles = [ax.get_title().replace("\n", "") for ax in fig.axes if ax.get_title()]
    assert titles == [name.removeprefix("bert.encoder.layer.") for name in names]
    assert "bert.encoder.layer." in fig.get_suptitle()
    assert_no_overlapping_text(fig)


def test_log_axes_spanning_under_two_decades_write_plain_numbers():
    frame = spectra_frame(LAYERS, n=3)
    frame["sigma"] = 30 + 40 * frame["sigma_rel"]  # 30..70: under one decade
    ax = plots.spectrum(frame, "conv")
    ax.figure.canvas.draw()
    inside, _ = _shown_ticks(ax.yaxis)
    labels = [t.get_text() for t in inside if t.get_visible() and t.get_text()]
    assert {"30", "40", "50", "60", "70"} <= set(labels), labels
    assert all(float(s) > 0 for s in labels)  # plain numbers: no 6×10¹ (mathtext) left


# --------------------------------------------------------------------------- ranks and beta
def _end_labels(ax) -> list:
    return [t for t in ax.texts if t.get_gid() != "undefined"]


def test_rank_trajectories_name_each_line_at_its_end():
    frame = ranks_frame(LAYERS)
    ax = plots.rank_trajectories(frame)
    assert [line.get_label() for line in ax.lines] == LAYERS
    np.testing.assert_allclose(ax.lines[1].get_ydata(), frame[frame.layer == "conv"].stable_rank)
    labels = _end_labels(ax)
    assert [t.get_text() for t in labels] == LAYERS
    assert [t.get_color() for t in labels] == [line.get_color() for line in ax.lines]
    for text, line in zip(labels, ax.lines):  # each label points at its line's last point
        assert text.xy == (line.get_xdata()[-1], line.get_ydata()[-1])
    assert ax.get_legend() is None and not ax.figure.legends and len(ax.figure.axes) == 1
    assert "stable rank" in ax.get_ylabel() and ax.get_xlabel() == "epoch"


@pytest.mark.parametrize("n_layers", [14, 60])
def test_rank_trajectories_labels_of_many_layers_are_distinct_and_do_not_overlap(n_layers):
    names = bert_names(2) if n_layers == 14 else [f"blocks.{j}.mlp.fc1" for j in range(60)]
    frame = ranks_frame(names)
    frame["stable_rank"] = 3.0 + 0.01 * frame["snapshot"]  # all lines end at the same height
    ax = plots.rank_trajectories(frame, column="stable_rank")
    prefix = "bert.encoder.layer." if n_layers == 14 else "blocks."
    assert [t.get_text() for t in _end_labels(ax)] == [n.removeprefix(prefix) for n in names]
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.lines}
    assert len(styles) == n_layers  # no two lines look alike
    fig = ax.figure
    fig.canvas.draw()
    right = ax.get_window_extent().x1
    assert all(_box(t).x0 > right for t in _end_labels(ax))  # off the data
    assert_no_overlapping_text(fig)


def test_rank_trajectories_skip_and_name_a_layer_without_finite_values():
    frame = ranks_frame(LAYERS)
    frame.loc[frame.layer == "conv", "stable_rank"] = np.nan  # NaN weights in every snapshot
    ax = plots.rank_trajectories(frame)
    assert [line.get_label() for line in ax.lines] == ["fc2", "attn"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), frame[frame.layer == "attn"].stable_rank)
    notes = [t.get_text() for t in ax.texts if t.get_gid() == "undefined"]
    assert notes == ["conv: no finite value"]
    frame["stable_rank"] = np.nan  # nothing finite at all: an empty, annotated figure
    ax = plots.rank_trajectories(frame)
    assert not ax.lines and ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == [f"{n}: no finite value" for n in LAYERS]
    assert_no_overlapping_text(ax.figure)


def test_beta_curve_marks_the_chosen_beta_and_its_share():
    frame = beta_frame()
    ax = plots.beta_curve(frame, beta=0.2)
    assert _marker_x(ax) == 0.2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), frame.trainable_share)
    share = np.interp(0.2, frame.beta, frame.trainable_share)
    assert any(t.get_text() == f"β = 0.2: {share:.1%} trainable" for t in ax.texts)
    np.testing.assert_allclose(_twin(ax).lines[0].get_ydata(), frame.min_energy)
    assert "chosen β = 0.2" in _legend_texts(ax)
    assert_legend_off_the_axes(ax)
    assert_no_overlapping_text(ax.figure)


# --------------------------------------------------------------------------- layer names
def test_common_prefix_of_bert_names_is_the_encoder_path():
    names = [*bert_names(2), "bert.encoder.layer.11.output.dense"]
    assert plots.common_prefix(names) == "bert.encoder.layer."
    assert plots.short_names(names)[:2] == ["0.attention.self.query", "0.attention.self.key"]
    assert plots.short_names(names)[-1] == "11.output.dense"
    with_head = [*names, "classifier"]
    assert plots.common_prefix(with_head) == ""  # nothing shared: full names
    assert plots.short_names(with_head) == with_head


@pytest.mark.parametrize(
    ("names", "want"),
    [
        (["model.layers.0.mlp", "model.layers.1.mlp"], ["0.mlp", "1.mlp"]),
        (["enc.a", "enc.a.b"], ["a", "a.b"]),  # a name never vanishes entirely
        (["only.one.name"], ["only.one.name"]),
        (["enc/0", "enc/1"], ["0", "1"]),  # checkpoint groups split at '/'
        (["layer10", "layer11"], ["layer10", "layer11"]),  # whole components only
        (["conv1", "conv2", "fc1", "head"], ["conv1", "conv2", "fc1", "head"]),
    ],
)
def test_short_names_are_unique_whole_component_suffixes(names, want):
    got = plots.short_names(names)
    assert got == want
    assert len(set(got)) == len(names)
    assert all(name.endswith(short) for name, short in zip(names, got))


def test_significant_rounds_epochs_to_three_digits_without_exponents():
    assert [significant(x) for x in (40 / 11, 25 / 11, 40.0, 1 / 23, 1234.5, 0.5)] == [
        "3.64",
        "2.27",
        "40",
        "0.0435",
        "1234",
        "0.5",
    ]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "column"),
    [
        (
            lambda: plots.stability_heatmap(stability_frame(LAYERS).drop(columns="epoch_b")),
            "epoch_b",
        ),
        (lambda: plots.stability_heatmap(stability_frame(LAYERS), value="Q"), "Q"),
        (lambda: plots.mean_stability(network_frame().drop(columns="mean_S")), "mean_S"),
        (lambda: plots.spectrum(spectra_frame(LAYERS).drop(columns="sigma"), "fc2"), "sigma"),
        (lambda: plots.rank_trajectories(ranks_frame(LAYERS), column="rank"), "rank"),
        (lambda: plots.beta_curve(beta_frame().drop(columns="beta")), "beta"),
    ],
)
def test_missing_column_raises_config_error_naming_it(call, column):
    with pytest.raises(ConfigError, match=f"'{column}'"):
        call()


def test_empty_or_foreign_frame_raises_config_error():
    with pytest.raises(ConfigError, match="`network` to hold at least one row"):
        plots.mean_stability(network_frame().iloc[:0])
    with pytest.raises(ConfigError, match="`ranks` to be a pandas DataFrame but got dict"):
        plots.rank_trajectories({"layer": []})


# --------------------------------------------------------------------------- output
def test_save_figure_writes_png_and_svg_and_closes(tmp_path):
    ax = plots.beta_curve(beta_frame(), beta=0.1)
    paths = plots.save_figure(ax, tmp_path / "sub" / "beta.v1")
    assert paths == [tmp_path / "sub" / "beta.v1.png", tmp_path / "sub" / "beta.v1.svg"]
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert not plt.fignum_exists(ax.figure.number)
    with pytest.raises(ConfigError, match="`formats`"):
        plots.save_figure(plt.figure(), tmp_path / "x", formats=("gif3",))


def test_import_basis_stability_does_not_import_matplotlib():
    code = "import sys, basis_stability; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
