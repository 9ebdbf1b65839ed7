"""analyze(): the report's tables against plain-numpy oracles, and runs that are odd on purpose
(NaN weights, one snapshot, a layer missing from late snapshots, a live writer, no snapshot)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.errors import ConfigError, DamagedRunError, RunFileError
from basis_stability.recommend.plan import PlanConfig
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

# "fc" Linear (24, 12); "conv" Conv2d (5, 2, 2, 2) seen as its (8, 5) transpose; "head" (10, 3)
LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (24, 12)),
    LayerView.of("conv", "conv.weight", "conv2d", (5, 2, 2, 2)),
    LayerView.of("head", "head.weight", "linear", (3, 10)),
]
NO_CACHE = EngineConfig(cache=False)


def _random_snapshots(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS] for _ in range(count)]


def _write(path: Path, snaps: list[list[np.ndarray]], layers=LAYERS) -> Path:
    with RunWriter.create(path, layers, model_class="Toy") as w:
        for t, mats in enumerate(snaps):
            w.append(iter(mats), step=7 * t + 3, epoch=0.5 * t)
    return path


# ---------------------------------------------------------------------- oracles
def _svd(w: np.ndarray):
    return np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)


def _oracle_s(wa: np.ndarray, wb: np.ndarray) -> float:
    ua, _, va = _svd(wa)
    ub, _, vb = _svd(wb)
    return float(np.trace((ua @ va).T @ (ub @ vb)) / wa.shape[1])


def _oracle_o(wa: np.ndarray, wb: np.ndarray, k: int) -> tuple[float, float]:
    ua, _, va = _svd(wa)
    ub, _, vb = _svd(wb)
    left = np.linalg.norm(ua[:, :k].T @ ub[:, :k]) ** 2 / k
    right = np.linalg.norm(va[:k] @ vb[:k].T) ** 2 / k
    return float(left), float(right)


def _oracle_pairs(count: int, lag: int) -> dict[str, list[tuple[int, int]]]:
    return {
        "consecutive": [(t, t + 1) for t in range(count - 1)],
        "lag": [(t, t + lag) for t in range(count - lag)],
        "final": [(t, count - 1) for t in range(count - 1)],
        "initial": [(0, t) for t in range(1, count)],
    }


# ---------------------------------------------------------------------- stability
def test_stability_and_overlap_equal_a_numpy_oracle_for_every_pair_kind(tmp_path: Path):
    snaps = _random_snapshots(6)
    path = _write(tmp_path / "run.h5", snaps)
    report = analyze(path, AnalysisConfig(lag=2, k=3), NO_CACHE)
    stab = report.stability
    epochs, steps = 0.5 * np.arange(6), 7 * np.arange(6) + 3
    for i, view in enumerate(LAYERS):
        mine = stab[stab["layer"] == view.name]
        assert set(mine["kind"]) == {view.kind}
        for pair, want in _oracle_pairs(6, 2).items():
            rows = mine[mine["pair"] == pair]
            assert list(zip(rows["a"], rows["b"])) == want, (view.name, pair)
            for row in rows.itertuples():
                a, b = row.a, row.b
                assert row.lag == b - a
                assert (row.epoch_a, row.epoch_b) == (epochs[a], epochs[b])
                assert (row.step_a, row.step_b) == (steps[a], steps[b])
                assert row.k == 3 and row.reason is None
                assert abs(row.S - _oracle_s(snaps[a][i], snaps[b][i])) < 1e-5
                left, right = _oracle_o(snaps[a][i], snaps[b][i], 3)
                assert row.O_left == pytest.approx(left, abs=1e-4)
                assert row.O_right == pytest.approx(right, abs=1e-4)
    assert len(stab) == 3 * sum(len(p) for p in _oracle_pairs(6, 2).values())


def test_k_is_capped_at_the_layer_width_and_lag_at_the_run_length(tmp_path: Path):
    path = _write(tmp_path / "run.h5", _random_snapshots(3))
    report = analyze(path, AnalysisConfig(lag=5, k=8), NO_CACHE)
    ks = report.stability.groupby("layer")["k"].unique().to_dict()
    assert {n: list(v) for n, v in ks.items()} == {"fc": [8], "conv": [5], "head": [3]}
    lagged = report.stability[report.stability["pair"] == "lag"]
    assert set(lagged["lag"]) == {2}
    assert any("lag reduced from 5 to 2" in n for n in report.notes), report.notes
    assert report.plan.interval_snapshots == 2


# ---------------------------------------------------------------------- network and summary
def test_network_equals_a_pandas_oracle(tmp_path: Path):
    rng = np.random.default_rng(5)
    base = [rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS]
    snaps = []
    for t in range(6):  # fc never moves, conv drifts slowly, head is redrawn every time
        snaps.append(
            [
                base[0],
                (base[1] + 0.02 * t * rng.standard_normal(base[1].shape)).astype(np.float32),
                rng.standard_normal(base[2].shape).astype(np.float32),
            ]
        )
    snaps[4][1][0, 0] = np.nan  # conv's pairs touching snapshot 4 are NaN
    path = _write(tmp_path / "run.h5", snaps)
    tau = 0.995
    report = analyze(path, AnalysisConfig(lag=1, k=2), NO_CACHE, PlanConfig(tau=tau))
    lagged = report.stability[report.stability["pair"] == "lag"]
    sizes = {v.name: v.shape[0] * v.shape[1] for v in LAYERS}
    rows = []
    for b, grp in lagged.groupby("b"):
        s, size = grp["S"].to_numpy(), grp["layer"].map(sizes).to_numpy(float)
        known = ~np.isnan(s)
        rows.append(
            {
                "snapshot": b,
                "epoch": 0.5 * b,
                "step": 7 * b + 3,
                "mean_S": np.nanmean(s),
                "weighted_S": (s[known] * size[known]).sum() / size[known].sum(),
                # a NaN layer is excluded, not counted as unstable (issue 11)
                "stable_share": size[known & (np.nan_to_num(s) >= tau)].sum() / size[known].sum(),
                "known_share": size[known].sum() / size.sum(),
                "excluded": "; ".join(
                    f"{n} ({r})" for n, r in zip(grp["layer"][~known], grp["reason"][~known])
                ),
            }
        )
    want = pd.DataFrame(rows)
    got = report.network
    assert list(got.columns) == list(want.columns)
    np.testing.assert_array_equal(got["snapshot"], want["snapshot"])
    np.testing.assert_array_equal(got["epoch"], want["epoch"])
    np.testing.assert_array_equal(got["step"], want["step"])
    for col in ("mean_S", "weighted_S", "stable_share", "known_share"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-12, err_msg=col)
    assert list(got["excluded"]) == list(want["excluded"])
    assert "conv" in got.set_index("snapshot").loc[4, "excluded"]
    # the oracle is not trivial: shares between 0 and 1, NaN left out of the weighted mean
    assert 0 < got["stable_share"].min() < got["stable_share"].max() < 1
    nan_b = lagged[lagged["S"].isna()]["b"].unique()
    assert sorted(nan_b) == [4, 5]


def _rotating_run(path: Path, settle: int, count: int, lag_dip: bool = True) -> Path:
    """Layers W_t = Q_t diag(s): "settles" gets a fresh random Q_t until snapshot ``settle`` and
    keeps Q_settle afterwards (with a brief false calm at snapshots 1-2); "fixed" never moves;
    "never" gets a fresh Q_t every time."""
    views = [
        LayerView.of("settles", "a.weight", "linear", (16, 6)),
        LayerView.of("fixed", "b.weight", "linear", (12, 4)),
        LayerView.of("never", "c.weight", "linear", (10, 5)),
    ]
    rng = np.random.default_rng(11)

    def basis(m: int, n: int) -> np.ndarray:
        return np.linalg.qr(rng.standard_normal((m, n)))[0]

    spectra = [np.linspace(3.0, 1.0, v.shape[1]) for v in views]
    fixed_q = basis(*views[1].shape)
    q_settle = None
    with RunWriter.create(path, views, model_class="Toy") as w:
        for t in range(count):
            if t < settle and not (lag_dip and t == 2):
                q_settle = basis(*views[0].shape)
            q = [q_settle, fixed_q, basis(*views[2].shape)]
            mats = [(qi * s).astype(np.float32) for qi, s in zip(q, spectra)]
            w.append(iter(mats), step=100 * t, epoch=float(t))
    return path


@pytest.mark.parametrize("lag", [1, 2])
def test_summary_final_s_and_stable_from_epoch_on_a_run_that_settles(tmp_path: Path, lag: int):
    path = _rotating_run(tmp_path / "run.h5", settle=6, count=10)
    report = analyze(path, AnalysisConfig(lag=lag, k=2), NO_CACHE)
    summary = report.summary.set_index("layer")
    lagged = report.stability[report.stability["pair"] == "lag"].set_index(["layer", "b"])
    # S jumps to 1 once both ends of the pair use Q_5 (the last fresh basis)
    for b in range(lag, 10):
        s = lagged.loc[("settles", b), "S"]
        calm = b - lag >= 5 or (b - lag, b) == (1, 2)  # (1, 2): the false calm
        assert (s == pytest.approx(1.0, abs=1e-5)) == calm, (b, s)
    assert summary.loc["settles", "stable_from_epoch"] == 5 + lag  # epochs equal indices here
    assert summary.loc["fixed", "stable_from_epoch"] == lag  # stable at the first lag pair
    assert math.isnan(summary.loc["never", "stable_from_epoch"])
    assert summary.loc["settles", "final_S"] == pytest.approx(1.0, abs=1e-5)
    assert summary.loc["never", "final_S"] < 0.9
    if lag == 1:  # the false calm (S(1, 2) = 1) does not count: it did not last
        assert lagged.loc[("settles", 2), "S"] == pytest.approx(1.0, abs=1e-5)
    assert list(summary["m"]) == [16, 12, 10] and list(summary["params"]) == [96, 48, 50]
    # delay: 90% of parameters stable needs "settles" and "fixed" (144 of 194 < 90%): none
    assert report.plan.delay_snapshot is None
    share = report.network.set_index("snapshot")["stable_share"]
    assert share.iloc[-1] == pytest.approx(144 / 194)


def test_delay_from_the_run_that_settles(tmp_path: Path):
    path = _rotating_run(tmp_path / "run.h5", settle=6, count=10)
    report = analyze(path, AnalysisConfig(lag=1, k=2), NO_CACHE, PlanConfig(share=0.7))
    plan = report.plan
    assert (plan.delay_snapshot, plan.delay_epoch, plan.delay_step) == (6, 6.0, 600)
    assert (plan.interval_snapshots, plan.interval_epochs, plan.interval_steps) == (1, 1.0, 100)


# ---------------------------------------------------------------------- spectra and ranks
def test_spectra_and_ranks_equal_numpy(tmp_path: Path):
    snaps = _random_snapshots(3, seed=4)
    path = _write(tmp_path / "run.h5", snaps)
    eps = 0.2
    report = analyze(path, AnalysisConfig(lag=1, k=2, eps=eps), NO_CACHE)
    beta = report.plan.beta
    ranks = report.ranks.set_index(["layer", "snapshot"])
    spectra = report.spectra
    for i, view in enumerate(LAYERS):
        for t in range(3):
            s = np.linalg.svd(snaps[t][i].astype(np.float64), compute_uv=False)
            row = ranks.loc[(view.name, t)]
            assert (row["m"], row["n"], row["kind"]) == (*view.shape, view.kind)
            assert (row["epoch"], row["step"]) == (0.5 * t, 7 * t + 3)
            assert row["finite"]
            assert row["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-5)
            p = s / s.sum()
            assert row["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
            cum = np.cumsum(s**2) / (s**2).sum()
            assert row["energy_rank"] == int(np.argmax(cum >= 1 - eps)) + 1
            assert row["rank_beta"] == int((s >= beta * s[0]).sum())
            sig = spectra[(spectra["layer"] == view.name) & (spectra["snapshot"] == t)]
            assert list(sig["i"]) == list(range(1, len(s) + 1))
            np.testing.assert_allclose(sig["sigma"], s, rtol=1e-5)
            np.testing.assert_allclose(sig["sigma_rel"], s / s[0], rtol=1e-5)
    last = report.ranks[report.ranks["snapshot"] == 2].set_index("layer")
    summary = report.summary.set_index("layer")
    for col in ("stable_rank", "effective_rank", "energy_rank", "rank_beta"):
        np.testing.assert_array_equal(summary[col], last.loc[summary.index, col], err_msg=col)


# ---------------------------------------------------------------------- odd runs
def test_nan_snapshot_is_flagged_and_the_rest_goes_on(tmp_path: Path):
    snaps = _random_snapshots(5, seed=6)
    snaps[2][0][3, 1] = np.nan
    path = _write(tmp_path / "run.h5", snaps)
    report = analyze(path, AnalysisConfig(lag=1, k=2), NO_CACHE)
    ranks = report.ranks.set_index(["layer", "snapshot"])
    assert not ranks.loc[("fc", 2), "finite"]
    assert math.isnan(ranks.loc[("fc", 2), "stable_rank"])
    assert ranks["finite"].sum() == len(ranks) - 1
    stab = report.stability
    fc = stab[stab["layer"] == "fc"]
    touching = (fc["a"] == 2) | (fc["b"] == 2)
    assert fc[touching]["S"].isna().all() and fc[touching]["O_left"].isna().all()
    assert fc[touching]["reason"].str.contains("NaN").all()
    assert fc[~touching]["S"].notna().all() and fc[~touching]["reason"].isna().all()
    for row in fc[~touching].itertuples():
        assert abs(row.S - _oracle_s(snaps[row.a][0], snaps[row.b][0])) < 1e-5
    assert stab[stab["layer"] != "fc"]["S"].notna().all()
    assert any("fc, snapshot 2" in n and "NaN" in n for n in report.notes), report.notes
    spectra = report.spectra
    assert spectra[(spectra["layer"] == "fc") & (spectra["snapshot"] == 2)].empty
    assert report.plan is not None
    assert "flagged" in report.text()


def test_single_snapshot_gives_spectra_and_ranks_and_a_note(tmp_path: Path):
    snaps = _random_snapshots(1)
    path = _write(tmp_path / "run.h5", snaps)
    report = analyze(path, AnalysisConfig(), NO_CACHE)
    assert report.n_snapshots == 1
    assert report.stability.empty and report.network.empty
    assert {"layer", "pair", "a", "b", "S", "O_left", "reason"} <= set(report.stability.columns)
    assert len(report.ranks) == 3 and report.ranks["finite"].all()
    assert len(report.spectra) == sum(v.shape[1] for v in LAYERS)
    assert any("stability needs two" in n for n in report.notes), report.notes
    assert report.summary["final_S"].isna().all()
    assert report.plan is not None and report.plan.delay_snapshot is None
    text = report.text()
    for view in LAYERS:
        assert view.name in text


def test_layer_short_of_the_committed_snapshots_is_a_clear_error(tmp_path: Path):
    """A layer with fewer rows than /snapshots commits is damage (the writer grows layers first):
    analysing it used to leave the snapshots out with a note; now it names the layer."""
    snaps = _random_snapshots(5, seed=8)
    path = _write(tmp_path / "run.h5", snaps)
    with h5py.File(path, "r+") as f:
        f["layers/conv"].resize(3, axis=0)  # conv has rows for snapshots 0-2 only
    with pytest.raises(DamagedRunError, match="layer 'conv' holds 3 rows for 5 snapshots"):
        analyze(path, AnalysisConfig(lag=1, k=2))


def test_run_still_being_written(tmp_path: Path):
    snaps = _random_snapshots(5, seed=9)
    path = tmp_path / "live.h5"
    writer = RunWriter.create(path, LAYERS, model_class="Toy")
    try:
        for t in range(3):
            writer.append(iter(snaps[t]), step=t, epoch=float(t))
        first = analyze(path, AnalysisConfig(lag=1, k=2))
        assert (first.n_snapshots, first.computed) == (3, 9)
        for t in range(3, 5):
            writer.append(iter(snaps[t]), step=t, epoch=float(t))
        second = analyze(path, AnalysisConfig(lag=1, k=2))
    finally:
        writer.close()
    assert (second.n_snapshots, second.computed) == (5, 6)
    last = second.stability[
        (second.stability["pair"] == "consecutive") & (second.stability["b"] == 4)
    ]
    for row in last.itertuples():
        i = [v.name for v in LAYERS].index(row.layer)
        assert abs(row.S - _oracle_s(snaps[3][i], snaps[4][i])) < 1e-5


@pytest.mark.parametrize("open_writer", [False, True])
def test_zero_snapshot_run_raises(tmp_path: Path, open_writer: bool):
    path = tmp_path / "empty.h5"
    writer = RunWriter.create(path, LAYERS, model_class="Toy")
    try:
        if not open_writer:
            writer.close()
        with pytest.raises(RunFileError, match="no committed snapshot"):
            analyze(path)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"lag": 0}, "lag"), ({"k": 0}, "k"), ({"eps": 1.0}, "eps")]
)
def test_analysis_config_bad_values(kwargs: dict, name: str):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        AnalysisConfig(**kwargs)
