"""`bs.compare` and `bstab compare`: runs side by side, held to each run's own analysis and to
an independent numpy formula for S, with the bad inputs (layer mismatch, one snapshot, too few
runs, a missing or damaged run, existing outputs) handled as documented."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.cli import assert_clean_failure, bstab, one_error_line

import basis_stability as bs
from basis_stability.analysis import EngineConfig
from basis_stability.analysis.compare import short_labels
from basis_stability.analysis.compare_output import output_names
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

FC = LayerView.of("fc", "fc.weight", "linear", (12, 6))
HEAD = LayerView.of("head", "head.weight", "linear", (3, 8))
EXTRA = LayerView.of("extra", "extra.weight", "linear", (10, 5))


def _weights(layers: list[LayerView], count: int, seed: int) -> list[list[np.ndarray]]:
    """A random walk per layer (each snapshot a small step from the last), so S is near 1."""
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(v.shape) for v in layers]
    out = []
    for _ in range(count):
        out.append([w.astype(np.float32) for w in start])
        start = [w + 0.3 * rng.standard_normal(w.shape) for w in start]
    return out


def _run(path: Path, layers=(FC, HEAD), count=5, seed=0) -> tuple[Path, list[list[np.ndarray]]]:
    """A run file of ``layers`` with ``count`` snapshots (epoch = t) and made-up metrics."""
    snaps = _weights(list(layers), count, seed)
    writer = RunWriter.create(path, list(layers), model_class="Toy")
    for t, mats in enumerate(snaps):
        metrics = {"val_acc": 0.5 + 0.01 * t + seed / 100, "val_loss": 1.0 / (t + 1 + seed)}
        writer.append(iter(mats), step=10 * t, epoch=t, metrics=metrics if t else None)
    writer.close()
    return path, snaps


def _numpy_s(a: np.ndarray, b: np.ndarray) -> float:
    """SPEC §2 from scratch: S = tr(B_aᵀ B_b) / n with B = U Vᵀ of the tall matrix."""
    bases = []
    for w in (a, b):
        w = w.astype(np.float64)
        w = w if w.shape[0] >= w.shape[1] else w.T
        u, _, vt = np.linalg.svd(w, full_matrices=False)
        bases.append(u @ vt)
    return float(np.trace(bases[0].T @ bases[1]) / bases[0].shape[1])


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    return _run(tmp_path / "toy-seed0.h5")[0], _run(tmp_path / "toy-seed1.h5", seed=1)[0]


# ---------------------------------------------------------------------- against oracles
def test_final_s_per_layer_is_each_runs_own_analysis_and_the_difference_theirs(two_runs):
    first, second = two_runs
    cmp = bs.compare([first, second])
    assert cmp.labels == ["seed0", "seed1"]
    own = {label: bs.analyze(path).summary.set_index("layer") for label, path in cmp.paths.items()}
    table = cmp.layers.set_index("layer")
    assert list(table.index) == list(own["seed0"].index)  # run order, every layer once
    for label in cmp.labels:
        np.testing.assert_allclose(table[f"final_S[{label}]"], own[label]["final_S"], rtol=1e-12)
    np.testing.assert_allclose(
        table["diff[seed1]"], own["seed1"]["final_S"] - own["seed0"]["final_S"], rtol=1e-12
    )
    assert (table["in_runs"] == "all").all()
    ranks = cmp.layer_ranks.set_index(["layer", "run"])
    for label in cmp.labels:
        for col in ("stable_rank", "effective_rank", "energy_rank"):
            np.testing.assert_allclose(
                ranks.xs(label, level="run")[col], own[label][col], rtol=1e-12
            )


def test_final_s_matches_the_numpy_formula_at_lag_one(tmp_path):
    (a, snaps_a), (b, snaps_b) = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", seed=7)
    cmp = bs.compare([a, b], config=bs.AnalysisConfig(lag=1))
    table = cmp.layers.set_index("layer")
    for label, snaps in (("a", snaps_a), ("b", snaps_b)):
        for j, view in enumerate((FC, HEAD)):
            want = _numpy_s(snaps[-2][j], snaps[-1][j])
            assert table.loc[view.name, f"final_S[{label}]"] == pytest.approx(want, abs=1e-6)
    want = _numpy_s(snaps_b[-2][0], snaps_b[-1][0]) - _numpy_s(snaps_a[-2][0], snaps_a[-1][0])
    assert table.loc["fc", "diff[b]"] == pytest.approx(want, abs=1e-6)


def test_the_runs_table_holds_final_metrics_stable_share_and_the_plan(two_runs):
    cmp = bs.compare(list(two_runs))
    rows = cmp.runs.set_index("run")
    for label, path in cmp.paths.items():
        report = bs.analyze(path)
        with bs.open_run(path) as run:
            table = run.snapshots()
        assert rows.loc[label, "final_val_acc"] == table["val_acc"].iloc[-1]
        assert rows.loc[label, "final_val_loss"] == table["val_loss"].iloc[-1]
        assert rows.loc[label, "final_stable_share"] == report.network["stable_share"].iloc[-1]
        assert rows.loc[label, "beta"] == report.plan.beta
        assert rows.loc[label, "snapshots"] == 5
    got = cmp.metrics[(cmp.metrics["run"] == "seed1") & (cmp.metrics["metric"] == "val_acc")]
    assert list(got["epoch"]) == [1, 2, 3, 4]  # the initial snapshot logged none
    assert set(cmp.network["run"]) == {"seed0", "seed1"}


# ---------------------------------------------------------------------- bad input
def test_layers_not_in_every_run_are_compared_where_present_and_listed(tmp_path):
    a, _ = _run(tmp_path / "a.h5", layers=(FC, HEAD))
    b, _ = _run(tmp_path / "b.h5", layers=(FC, EXTRA), seed=1)
    cmp = bs.compare([a, b])
    table = cmp.layers.set_index("layer")
    assert list(table.index) == ["fc", "head", "extra"]
    assert table["in_runs"].to_dict() == {"fc": "all", "head": "a", "extra": "b"}
    assert math.isfinite(table.loc["fc", "diff[b]"])
    assert math.isnan(table.loc["head", "diff[b]"]) and math.isnan(table.loc["extra", "diff[b]"])
    note = next(n for n in cmp.notes if "not in every run" in n)
    assert "only in a: head" in note and "only in b: extra" in note
    assert "in runs" in cmp.text()


def test_runs_of_different_lengths_are_aligned_by_epoch(tmp_path):
    a, _ = _run(tmp_path / "long.h5", count=9)
    b, _ = _run(tmp_path / "short.h5", count=5, seed=1)
    cmp = bs.compare([a, b], config=bs.AnalysisConfig(lag=2))
    assert cmp.x == "epoch"
    assert cmp.runs.set_index("run")["last_epoch"].to_dict() == {"long": 8.0, "short": 4.0}
    epochs = cmp.network.groupby("run")["epoch"].apply(list).to_dict()
    assert epochs == {"long": [2, 3, 4, 5, 6, 7, 8], "short": [2, 3, 4]}
    assert any("end at different epochs (long 8, short 4)" in n for n in cmp.notes)


def test_a_run_with_one_snapshot_is_included_with_a_note(tmp_path):
    a, _ = _run(tmp_path / "a.h5")
    one, _ = _run(tmp_path / "one.h5", count=1)
    cmp = bs.compare([a, one])
    assert cmp.labels == ["a", "one"]
    assert cmp.layers["final_S[one]"].isna().all()
    assert (cmp.layer_ranks[cmp.layer_ranks["run"] == "one"]["stable_rank"] > 0).all()
    assert set(cmp.network["run"]) == {"a"}
    assert any(n.startswith("one has one snapshot: no stability pairs") for n in cmp.notes)


def test_the_same_file_twice_is_compared_once_with_a_note(two_runs):
    first, second = two_runs
    cmp = bs.compare([first, second, first])
    assert cmp.labels == ["seed0", "seed1"]
    assert any("given more than once" in n and str(first) in n for n in cmp.notes)


@pytest.mark.parametrize(
    ("paths", "fragment"),
    [
        (lambda a, b: [a], "two or more different run files"),
        (lambda a, b: [a, a], "The same file given twice counts once"),
        (lambda a, b: str(a), "a list of two or more run files"),
    ],
    ids=["one", "same-twice", "a-str"],
)
def test_fewer_than_two_runs_is_a_clear_error(two_runs, paths, fragment):
    with pytest.raises(bs.BstabError, match="`paths`") as caught:
        bs.compare(paths(*two_runs))
    assert fragment in str(caught.value)


def test_short_labels_drop_what_every_stem_shares():
    def labels(*names):
        return short_labels([Path(n) for n in names])

    assert labels("r/cnn-digits-seed0.h5", "r/cnn-digits-seed1.h5") == ["seed0", "seed1"]
    assert labels("full-cnn.h5", "oialr-cnn.h5") == ["full", "oialr"]
    assert labels("lr_1e-3_cnn.h5", "lr_3e-4_cnn.h5") == ["1e-3", "3e-4"]
    assert labels("run.h5", "run-2.h5") == ["run", "run-2"]  # every label keeps one part
    assert labels("a/run.h5", "b/run.h5") == ["a", "b"]  # the same name: the folders tell
    assert labels("x/a/run.h5", "y/a/run.h5") == ["a-run#1", "a-run#2"]  # numbered


# ---------------------------------------------------------------------- the command line
def test_cli_prints_the_tables_and_writes_csvs_and_figures(two_runs, tmp_path):
    out = tmp_path / "cmp"
    result = bstab("compare", *two_runs, "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 runs: seed0 = " in result.output and "Δ seed1" in result.output
    assert "val_acc" in result.output
    written = {p.name for p in out.iterdir()}
    assert {"runs.csv", "layers.csv", "layer_ranks.csv", "network.csv", "metrics.csv"} <= written
    assert {"mean_stability.png", "final_S.svg", "ranks.png", "metrics.svg"} <= written
    assert written <= set(output_names())
    layers = pd.read_csv(out / "layers.csv")
    cmp = bs.compare(list(two_runs))
    np.testing.assert_allclose(layers["diff[seed1]"], cmp.layers["diff[seed1]"], rtol=1e-12)


def test_cli_takes_the_analysis_options_of_analyze_for_every_run(two_runs, tmp_path):
    from basis_stability.analysis import AnalysisConfig
    from basis_stability.recommend import PlanConfig

    out = tmp_path / "cmp"
    result = bstab("compare", *two_runs, "-o", out, "--lag", "2", "--tau", "0.5", "--no-cache")
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    default = bs.compare(list(two_runs)).runs.set_index("run")
    for label, path in zip(("seed0", "seed1"), two_runs):
        own = bs.analyze(path, AnalysisConfig(lag=2), plan=PlanConfig(tau=0.5))
        got = runs.loc[label]
        assert got["lag_snapshots"] == 2 and default.loc[label, "lag_snapshots"] == 4
        assert got["delay_epoch"] == own.plan.delay_epoch  # default tau 0.99: no delay
        assert np.isnan(default.loc[label, "delay_epoch"])
        assert got["final_stable_share"] == pytest.approx(own.network["stable_share"].iloc[-1])
        assert got["final_stable_share"] != pytest.approx(default.loc[label, "final_stable_share"])
    line = one_error_line(bstab("compare", *two_runs, "--device", "tpu", "-o", tmp_path / "x"))
    assert "`--device`" in line and "device=" not in line and not (tmp_path / "x").exists()


def test_cli_writes_beside_the_first_run_by_default(two_runs):
    result = bstab("compare", *two_runs)
    assert result.exit_code == 0, result.output
    assert (two_runs[0].parent / "compare-seed0-vs-seed1" / "layers.csv").is_file()


def test_cli_refuses_an_existing_output_unchanged_and_force_replaces_it(two_runs, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "layers.csv").write_bytes(b"mine\n")
    result = bstab("compare", *two_runs, "-o", out)
    line = one_error_line(result)
    assert "layers.csv already exists" in line and "--force" in line and "--output" in line
    assert (out / "layers.csv").read_bytes() == b"mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["layers.csv"]  # nothing else written
    result = bstab("compare", *two_runs, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "layers.csv").read_text().startswith("layer,m,n,in_runs")


def test_cli_names_a_missing_or_damaged_run_in_one_line(two_runs, tmp_path):
    missing = tmp_path / "nope.h5"
    line = one_error_line(bstab("compare", two_runs[0], missing, "-o", tmp_path / "o"))
    assert str(missing) in line
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(b"not an hdf5 file" * 64)
    line = one_error_line(bstab("compare", two_runs[0], damaged, "-o", tmp_path / "o"))
    assert str(damaged) in line
    assert not (tmp_path / "o").exists()


def test_cli_with_fewer_than_two_runs_fails_cleanly(two_runs):
    assert_clean_failure(bstab("compare", two_runs[0]), "two or more different run files")
    assert_clean_failure(bstab("compare"), "two or more")
    twice = one_error_line(bstab("compare", two_runs[0], two_runs[0]))
    assert "the same file given twice counts once" in twice
    assert "bstab compare runs/full.h5 runs/oialr.h5" in twice  # the fix in the CLI's terms
    assert "[" not in twice and "`paths`" not in twice  # not the Python list of bs.compare


# ---------------------------------------------------------------------- the figures
def test_the_figures_keep_one_colour_per_run_and_read_the_legend_off_the_data(two_runs):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    cmp = bs.compare(list(two_runs))
    pc = bs.plots_compare
    ax = pc.stability_over_epochs(cmp.network, runs=cmp.labels)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["seed0", "seed1"]
    only_second = cmp.metrics[cmp.metrics["run"] == "seed1"]
    ax = pc.metric_over_epochs(only_second, "val_acc", runs=cmp.labels)
    assert ax.get_lines()[0].get_color() == "C1"  # seed1's colour, though it is drawn alone
    for ax in (pc.final_stability(cmp.layer_ranks), pc.ranks_by_layer(cmp.layer_ranks)):
        assert [t.get_text() for t in ax.get_xticklabels()] == list(cmp.layers["layer"])
        assert ax.get_xlabel() == "layer (model order)"  # no prefix shared: nothing dropped
    with pytest.raises(bs.BstabError, match="`metric`"):
        pc.metric_over_epochs(cmp.metrics, "accuracy")
    matplotlib.pyplot.close("all")


DOTTED = [
    LayerView.of("bert.encoder.layer.0.attention.self.query", "q.weight", "linear", (12, 6)),
    LayerView.of("bert.encoder.layer.0.output.dense", "o.weight", "linear", (3, 8)),
    LayerView.of("bert.encoder.layer.1.attention.self.query", "q1.weight", "linear", (10, 5)),
]


def _points_px(ax) -> np.ndarray:
    """Every drawn data point of ``ax`` in display pixels (lines' vertices, markers)."""
    points = [
        line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
        for line in ax.get_lines()
    ]
    points = np.concatenate(points) if points else np.empty((0, 2))
    return points[np.isfinite(points).all(axis=1)]


def test_compare_figures_drop_the_shared_prefix_and_keep_legends_off_every_point(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from basis_stability.analysis.compare_output import draw_figures

    runs = [_run(tmp_path / f"bert-lr{k}.h5", layers=DOTTED, count=6, seed=k)[0] for k in (1, 3)]
    figs = draw_figures(bs.compare(runs))
    assert {"mean_stability", "final_S", "ranks", "metrics"} <= set(figs)
    short = ["0.attention.self.query", "0.output.dense", "1.attention.self.query"]
    for name, fig in figs.items():
        fig.canvas.draw()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert len(legends) == 1, name  # panels side by side share one legend
        box = legends[0].get_window_extent()
        for ax in fig.axes:
            points = _points_px(ax)
            assert len(points), (name, ax.get_title())
            inside = (
                (points[:, 0] >= box.x0)
                & (points[:, 0] <= box.x1)
                & (points[:, 1] >= box.y0)
                & (points[:, 1] <= box.y1)
            )
            assert not inside.any(), (name, ax.get_title(), points[inside])
            if name in ("final_S", "ranks"):
                assert [t.get_text() for t in ax.get_xticklabels()] == short
                assert ax.get_xlabel().endswith("prefix bert.encoder.layer. dropped")
    matplotlib.pyplot.close("all")


def test_a_run_still_being_recorded_is_named_by_analyze_and_compare(two_runs, tmp_path):
    sys.path.insert(0, str(Path(__file__).with_name("helpers")))
    from crash_trial import Writer

    run = tmp_path / "live.h5"
    writer = Writer(run, "--sizes", "24,16,8", "--count", "2", "--interval", "0.05", "--hold")
    try:
        writer.wait_for("holding")
        report = bs.analyze(run, engine=EngineConfig(cache=False))
        cmp = bs.compare([two_runs[0], run], engine=EngineConfig(cache=False))
        writer.release()
        assert writer.finish() == 0, writer.output()
    finally:
        writer.stop()
    assert report.live.startswith("still being recorded by process")
    assert report.notes[0].startswith("the run is still being recorded by process")
    assert "covers only what it had committed when it was read" in report.notes[0]
    live = "snapshots committed when it was read"
    assert any(
        n.startswith("live is still being recorded") and f"the {report.n_snapshots} {live}" in n
        for n in cmp.notes
    ), cmp.notes
    done = bs.analyze(run, engine=EngineConfig(cache=False))  # the writer closed it
    assert done.live is None and not any("being recorded" in n for n in done.notes)
