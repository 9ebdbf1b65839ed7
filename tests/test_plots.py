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

from basis_stability import plots
from basis_stability.errors import ConfigError

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


def test_heatmap_with_60_layers_thins_labels_that_do_not_overlap():
    layers = [f"encoder.layers.{j}.self_attn.out_proj" for j in range(60)]
    ax = plots.stability_heatmap(stability_frame(layers, n_snaps=40))
    fig = ax.figure
    fig.canvas.draw()
    assert fig.get_figheight() > 8  # grew with the number of layers
    for labels in (ax.get_yticklabels(), ax.get_xticklabels()):
        shown = [t for t in labels if t.get_visible() and t.get_text()]
        assert 2 <= len(shown) <= 25
        boxes = [t.get_window_extent() for t in shown]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert ax.get_yticklabels()[0].get_text() == layers[0]
    rows = {*ax.get_yticks(), *ax.get_yticks(minor=True)}
    assert rows == set(range(60))  # every row still has a tick mark


def test_heatmap_on_a_given_small_axes_thins_labels():
    fig, ax = plt.subplots(figsize=(4, 2))
    out = plots.stability_heatmap(stability_frame([f"l{j}" for j in range(30)]), ax=ax)
    assert out is ax and fig.get_figheight() == 2
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert len(boxes) < 30
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_heatmap_rejects_unknown_pair_and_duplicate_rows():
    frame = stability_frame(LAYERS)
    with pytest.raises(ConfigError, match=r"`pair`.*'final'.*lag, consecutive"):
        plots.stability_heatmap(frame, pair="final")
    two_lags = pd.concat([frame, frame[frame.pair == "lag"].assign(lag=3)])
    with pytest.raises(ConfigError, match=r"one 'lag' row per \(layer, epoch_b\).*lag == 5"):
        plots.stability_heatmap(two_lags)


# --------------------------------------------------------------------------- network curve
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
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 5 and "stable share" in legend
    assert ax.get_ylabel() == "stability S = tr(B_aᵀB_b)/n" and ax.get_xlabel() == "epoch"


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


# --------------------------------------------------------------------------- ranks and beta
def test_rank_trajectories_legend_for_few_layers():
    frame = ranks_frame(LAYERS)
    ax = plots.rank_trajectories(frame)
    assert [line.get_label() for line in ax.lines] == LAYERS
    np.testing.assert_allclose(ax.lines[1].get_ydata(), frame[frame.layer == "conv"].stable_rank)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == LAYERS
    assert len(ax.figure.axes) == 1
    assert "stable rank" in ax.get_ylabel() and ax.get_xlabel() == "epoch"


def test_rank_trajectories_colour_bar_for_many_layers():
    ax = plots.rank_trajectories(ranks_frame([f"l{j}" for j in range(20)]), column="energy_rank")
    assert len(ax.lines) == 20 and ax.get_legend() is None
    assert ax.figure.axes[-1].get_ylabel().startswith("layer depth")
    assert ax.lines[0].get_color() != ax.lines[-1].get_color()


def test_rank_trajectories_skip_and_name_a_layer_without_finite_values():
    frame = ranks_frame(LAYERS)
    frame.loc[frame.layer == "conv", "stable_rank"] = np.nan  # NaN weights in every snapshot
    ax = plots.rank_trajectories(frame)
    assert [line.get_label() for line in ax.lines] == ["fc2", "attn"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), frame[frame.layer == "attn"].stable_rank)
    notes = [t.get_text() for t in ax.texts if t.get_gid() == "undefined"]
    assert notes == ["not drawn (no finite value): conv"]
    frame["stable_rank"] = np.nan  # nothing finite at all: an empty, annotated figure
    ax = plots.rank_trajectories(frame)
    assert not ax.lines and ax.get_legend() is None
    assert "fc2, conv, attn" in ax.texts[-1].get_text()


def test_beta_curve_marks_the_chosen_beta_and_its_share():
    frame = beta_frame()
    ax = plots.beta_curve(frame, beta=0.2)
    assert _marker_x(ax) == 0.2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), frame.trainable_share)
    share = np.interp(0.2, frame.beta, frame.trainable_share)
    assert any(t.get_text() == f"β = 0.2: {share:.1%} trainable" for t in ax.texts)
    np.testing.assert_allclose(_twin(ax).lines[0].get_ydata(), frame.min_energy)
    assert "chosen β = 0.2" in [t.get_text() for t in ax.get_legend().get_texts()]


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
