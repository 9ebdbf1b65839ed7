"""A lag in time (``--lag 5ep``, ``--lag 200steps``): the pairs against a plain-python oracle of
the documented rule, S of those pairs against numpy, the plan's interval, the warning for
unevenly spaced snapshots under a lag in snapshots, and one clean error per bad lag."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.cli import assert_clean_failure, bstab, one_error_line

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis.lag import Lag, is_uneven, lag_pairs
from basis_stability.errors import ConfigError
from basis_stability.recommend.plan import Interval, PlanConfig, make_plan
from basis_stability.recording import Recorder
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (12, 6)),
    LayerView.of("head", "head.weight", "linear", (3, 8)),  # stored as its (8, 3) transpose
]
NO_CACHE = EngineConfig(cache=False)
UNEVEN = [1.0, 2.0, 5.0, 10.0, 20.0]  # the issue's checkpoints


def _run(path: Path, epochs, steps=None, seed: int = 0) -> tuple[Path, list[list[np.ndarray]]]:
    """A run of LAYERS at these epochs (NaN: unknown) and steps (default -1: unknown)."""
    rng = np.random.default_rng(seed)
    steps = [-1] * len(epochs) if steps is None else steps
    snaps = [[rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS] for _ in epochs]
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        for mats, epoch, step in zip(snaps, epochs, steps):
            w.append(iter(mats), step=int(step), epoch=float(epoch))
    return path, snaps


# ---------------------------------------------------------------------- oracles
def _oracle_pairs(times: list[float], lag: float) -> list[tuple[int, int]]:
    """The rule of docs/analysis.md in plain python: each b with a known time pairs with the
    earlier snapshot nearest to t(b) - lag (ties: the earlier one), if within
    min(lag, median gap) / 2."""
    known = [i for i, t in enumerate(times) if t == t and t >= 0]  # t == t: not NaN
    gaps = [times[j] - times[i] for i, j in zip(known, known[1:]) if times[j] > times[i]]
    tol = min(lag, statistics.median(gaps)) / 2
    out = []
    for b in known:
        best = None
        for a in known:
            if a >= b or times[a] >= times[b]:
                continue
            miss = abs(times[a] - (times[b] - lag))
            if best is None or miss < best[0]:  # strict: a tie keeps the earlier a
                best = (miss, a)
        if best is not None and best[0] <= tol + 1e-12:
            out.append((best[1], b))
    return out


def _oracle_s(wa: np.ndarray, wb: np.ndarray) -> float:
    def polar(w):
        u, _, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
        return u @ vt

    return float(np.trace(polar(wa).T @ polar(wb)) / min(wa.shape))


def _lag_rows(report) -> pd.DataFrame:
    return report.stability[report.stability["pair"] == "lag"]


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("given", "value", "unit"),
    [
        (5, 5, "snapshots"),
        ("5", 5, "snapshots"),
        ("5ep", 5.0, "epochs"),
        ("5epochs", 5.0, "epochs"),
        ("2.5ep", 2.5, "epochs"),
        (" 0.5 epoch ", 0.5, "epochs"),
        ("200steps", 200, "steps"),
        ("200st", 200, "steps"),
        ("1e3steps", 1000, "steps"),
    ],
)
def test_lag_parses_snapshots_epochs_and_steps(given, value, unit: str):
    lag = Lag.parse(given)
    assert (lag.value, lag.unit) == (value, unit)
    assert type(lag.value) is (float if unit == "epochs" else int)
    assert Lag.parse(str(lag)) == lag  # str() is what plan.json records
    assert AnalysisConfig(lag=given).lag == lag


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        (
            "5 days",
            "Expected `lag` to be a number of snapshots (5), epochs (5ep) or steps (200steps) "
            "but got '5 days'.",
        ),
        ("0ep", "Expected `lag` to be positive but got '0ep'."),
        ("-5ep", "to be positive"),
        (0, "to be positive"),
        (-3, "to be positive"),
        ("2.5", "a whole number of snapshots but got '2.5'. Pass 2.5ep"),
        ("2.5steps", "a whole number of steps"),
        ("ep", "a number of snapshots (5)"),
        (True, "a number of snapshots (5)"),
        (2.5, "a number of snapshots (5)"),
    ],
)
def test_bad_lag_names_the_argument_the_value_and_the_fix(given, fragment: str):
    with pytest.raises(ConfigError) as info:
        AnalysisConfig(lag=given)
    assert fragment in str(info.value)
    assert "`lag`" in str(info.value)


# ---------------------------------------------------------------------- the pairing rule
def test_the_issue_checkpoints_pair_by_elapsed_epochs(tmp_path: Path):
    # gaps 1, 3, 5, 10 (median 4): tolerance min(5, 4) / 2 = 2 epochs. 1->5 (4 epochs, 1 off)
    # and 5->10 (exact) pair; 2 (nothing near -3) and 20 (10 is 5 off 15) do not
    path, _ = _run(tmp_path / "run.h5", UNEVEN)
    report = analyze(path, AnalysisConfig(lag="5ep"), NO_CACHE)
    want = [(0, 2), (2, 3)]
    assert _oracle_pairs(UNEVEN, 5.0) == want
    for layer in ("fc", "head"):
        rows = _lag_rows(report)[lambda f, name=layer: f["layer"] == name]
        assert list(zip(rows["a"], rows["b"])) == want
        assert list(rows["lag"]) == [2, 1]  # the snapshot distance b - a
        assert list(rows["epoch_a"]) == [1.0, 5.0] and list(rows["epoch_b"]) == [5.0, 10.0]
    # the other pair kinds do not change
    consecutive = report.stability[report.stability["pair"] == "consecutive"]
    assert sorted(set(zip(consecutive["a"], consecutive["b"]))) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert list(report.network["snapshot"]) == [2, 3]


@pytest.mark.parametrize(
    ("times", "lag"),
    [
        ([1, 2, 5, 10, 20], 5.0),
        ([1, 2, 5, 10, 20], 19.0),
        ([1, 2, 5, 10, 20], 12.0),
        ([0, 1, 2, 3, 4, 5, 6], 2.5),  # ties (2 and 3 from 5): the earlier, a span >= 2.5
        ([0, 0.5, 1, 1.5, 3, 4.5, 6, 9, 12], 3.0),
        ([0, 1, 2, 4, 6, 8, 10], 2.0),
        ([0, 1, 1, 2, 3], 1.0),  # a repeated time pairs with neither copy of itself
        ([0, 2, 4, 1, 3, 5, 7], 2.0),  # times that step back (a resumed run)
    ],
)
def test_pairs_equal_the_oracle_of_the_documented_rule(times: list[float], lag: float):
    epochs = np.array(times, dtype=float)
    got = lag_pairs(Lag(lag, "epochs"), epochs, np.full(len(times), -1)).pairs
    assert got == _oracle_pairs([float(t) for t in times], lag)
    assert got  # every case pairs something


def test_pairs_equal_the_oracle_on_random_schedules():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(300):
        steps = np.cumsum(rng.integers(1, 60, size=rng.integers(2, 14)))
        steps = np.concatenate([[0], steps])
        lag = int(rng.integers(1, steps[-1] + 1))
        try:
            got = lag_pairs(Lag(lag, "steps"), np.full(len(steps), np.nan), steps).pairs
        except ConfigError as exc:  # only when the rule pairs nothing
            assert "apart" in str(exc)
            got = []
        assert got == _oracle_pairs([float(s) for s in steps], float(lag))
        checked += bool(got)
    assert checked > 100


def test_s_of_time_paired_rows_equals_numpy_on_the_two_snapshots(tmp_path: Path):
    epochs = [0, 0.5, 1, 1.5, 3, 4.5, 6, 9, 12]
    steps = [round(100 * e) for e in epochs]
    path, snaps = _run(tmp_path / "run.h5", epochs, steps, seed=4)
    report = analyze(path, AnalysisConfig(lag="300steps", k=2), NO_CACHE)
    rows = _lag_rows(report)
    want = _oracle_pairs([float(s) for s in steps], 300.0)
    assert len(want) >= 4
    for i, view in enumerate(LAYERS):
        mine = rows[rows["layer"] == view.name]
        assert list(zip(mine["a"], mine["b"])) == want
        for row in mine.itertuples():
            assert (row.step_a, row.step_b) == (steps[row.a], steps[row.b])
            assert row.lag == row.b - row.a
            assert abs(row.S - _oracle_s(snaps[row.a][i], snaps[row.b][i])) < 1e-5


def test_a_snapshot_without_an_epoch_has_no_lag_pair_and_a_note(tmp_path: Path):
    epochs = [0, 1, 2, np.nan, 4, 5, 6]
    path, _ = _run(tmp_path / "run.h5", epochs)
    report = analyze(path, AnalysisConfig(lag="2ep"), NO_CACHE)
    pairs = list(zip(*(_lag_rows(report).query("layer == 'fc'")[c] for c in ("a", "b"))))
    assert pairs == [(0, 2), (2, 4), (4, 6)] == _oracle_pairs([float(e) for e in epochs], 2.0)
    assert any("snapshot(s) 3 record no epoch" in n for n in report.notes), report.notes


def test_changing_the_lag_recomputes_no_svd(tmp_path: Path):
    """Pairing is done after the decomposition: the SVD cache serves every lag."""
    path, _ = _run(tmp_path / "run.h5", UNEVEN, [10 * round(e) for e in UNEVEN])
    first = analyze(path, AnalysisConfig(lag=2))
    assert first.computed == 2 * len(UNEVEN)
    for lag in ("5ep", "50steps", 1):
        assert analyze(path, AnalysisConfig(lag=lag)).computed == 0


# ---------------------------------------------------------------------- the plan
def test_plan_reports_the_time_lag_and_the_spans_it_used(tmp_path: Path):
    epochs = [0, 1, 2, 4, 6, 8, 10]
    steps = [100 * e for e in epochs]
    path, _ = _run(tmp_path / "run.h5", epochs, steps)
    report = analyze(path, AnalysisConfig(lag="2ep"), NO_CACHE)
    pairs = _oracle_pairs([float(e) for e in epochs], 2.0)
    plan = report.plan
    assert plan.rules["delay"]["lag"] == "2ep"
    assert plan.interval_epochs == statistics.median(epochs[b] - epochs[a] for a, b in pairs)
    assert plan.interval_steps == statistics.median(steps[b] - steps[a] for a, b in pairs)
    assert plan.interval_snapshots == round(statistics.median(b - a for a, b in pairs))
    assert [s for s, _ in plan.evidence["stable_share"]] == [b for _, b in pairs]
    assert "lag 2ep" in report.text()


def test_plan_of_a_lag_in_steps_on_a_run_without_epochs(tmp_path: Path):
    steps = [0, 50, 100, 150, 200, 250]
    path, _ = _run(tmp_path / "run.h5", [np.nan] * 6, steps)
    plan = analyze(path, AnalysisConfig(lag="100steps"), NO_CACHE).plan
    assert plan.rules["delay"]["lag"] == "100steps"
    assert (plan.interval_snapshots, plan.interval_epochs, plan.interval_steps) == (2, None, 100)


def test_a_lag_in_snapshots_keeps_its_plan_fields(tmp_path: Path):
    path, _ = _run(tmp_path / "run.h5", [0, 1, 2, 3, 4], [0, 10, 20, 30, 40])
    plan = analyze(path, AnalysisConfig(lag=2), NO_CACHE).plan
    assert plan.rules["delay"]["lag"] == 2
    assert (plan.interval_snapshots, plan.interval_epochs, plan.interval_steps) == (2, 2.0, 20)


def test_make_plan_records_a_measured_interval_as_given():
    index = pd.DataFrame({"snapshot": [0, 1, 2], "epoch": [0.0, 1, 5], "step": [0, 10, 50]})
    network = pd.DataFrame({"snapshot": [2], "epoch": [5.0], "step": [50], "stable_share": [1.0]})
    spectra = {t: {"a": np.array([2.0, 1.0])} for t in range(3)}
    interval = Interval("5ep", 2, 5.0, 50)
    plan, _ = make_plan(network, spectra, {"a": (4, 2)}, index, interval, "Toy", PlanConfig())
    assert (plan.interval_snapshots, plan.interval_epochs, plan.interval_steps) == (2, 5.0, 50)
    assert plan.rules["delay"]["lag"] == "5ep" and plan.delay_snapshot == 2


def test_interval_of_a_snapshot_lag_with_an_unknown_first_step_has_no_steps():
    # it used to be 100 - (-1) = 101 steps
    index = pd.DataFrame({"snapshot": [0, 1], "epoch": [np.nan, 1.0], "step": [-1, 100]})
    assert Interval.of_snapshots(1, index) == Interval(1, 1, None, None)


def test_one_snapshot_with_a_time_lag_is_spectra_only(tmp_path: Path):
    path, _ = _run(tmp_path / "run.h5", [0.0], [0])
    report = analyze(path, AnalysisConfig(lag="5ep"), NO_CACHE)
    assert _lag_rows(report).empty
    assert any("only one snapshot" in n for n in report.notes), report.notes


# ---------------------------------------------------------------------- uneven spacing
def _uneven_notes(report) -> list[str]:
    return [n for n in report.notes if "unevenly spaced" in n]


def test_uneven_epochs_under_a_lag_in_snapshots_warn_with_the_spacing_and_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path, _ = _run(tmp_path / "run.h5", UNEVEN)
    with caplog.at_level(logging.WARNING):
        report = analyze(path, AnalysisConfig(lag=1), NO_CACHE)
    (note,) = _uneven_notes(report)
    assert "snapshots are unevenly spaced (epochs 1, 2, 5, 10, 20)" in note
    assert "a lag of 1 snapshot pairs different time spans (1 to 10 epochs)" in note
    assert '`lag="4ep"`' in note  # the median span of the lag pairs (1, 3, 5, 10)
    logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in logged if "unevenly" in r.getMessage()] == [note]
    assert f"note: {note}" in report.text()


@pytest.mark.parametrize(
    ("epochs", "steps"),
    [
        ([0, 1, 2, 3, 4, 5], None),  # a snapshot per epoch
        ([np.nan] * 6, [0, 100, 200, 300, 400, 500]),  # step 0, then every 100 steps
        ([np.nan] * 6, [0, 50, 150, 250, 350, 450]),  # step 0, then every 100 from step 50
        ([0, 1, 3, 5, 7, 9], [0, 10, 30, 50, 70, 90]),  # the same in epochs: only gap 1 odd
        ([0, 0.5, 1.2, 1.7, 2.4], None),  # gaps within a factor 1.5 (0.5 to 0.7)
    ],
)
def test_even_spacing_does_not_warn(tmp_path: Path, epochs, steps):
    path, _ = _run(tmp_path / "run.h5", epochs, steps)
    assert _uneven_notes(analyze(path, AnalysisConfig(lag=1), NO_CACHE)) == []


def test_a_time_lag_on_uneven_snapshots_does_not_warn(tmp_path: Path):
    path, _ = _run(tmp_path / "run.h5", UNEVEN)
    assert _uneven_notes(analyze(path, AnalysisConfig(lag="5ep"), NO_CACHE)) == []


@pytest.mark.parametrize(
    ("times", "uneven"),
    [
        ([1, 2, 5, 10, 20], True),
        ([0, 1, 2, 3], False),
        ([0, 50, 150, 250], False),  # only the first gap is odd
        ([0, 100, 300, 400, 500], True),  # an odd gap later
        ([0, 1, 5], True),  # two gaps: the first is not dropped
        ([0, 1, 1, 2], True),  # a repeated time
        ([0, 10, 25], False),  # ratio exactly 1.5 is even
        ([0, 10, 26], True),
        ([3, 7], False),
    ],
)
def test_uneven_rule(times: list[float], uneven: bool):
    assert is_uneven(np.array(times, dtype=float)) is uneven


# ---------------------------------------------------------------------- the CLI
def test_cli_analyze_with_a_lag_in_epochs_end_to_end(tmp_path: Path):
    path, _ = _run(tmp_path / "run.h5", UNEVEN, [10 * round(e) for e in UNEVEN])
    out = tmp_path / "out"
    result = bstab("analyze", path, "-o", out, "--lag", "5ep", "--no-plots", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "lag 5ep" in result.output and "unevenly" not in result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rules"]["delay"]["lag"] == "5ep"
    assert (plan["interval_epochs"], plan["interval_steps"]) == (4.5, 45)
    stab = pd.read_csv(out / "stability.csv")
    lagged = stab[(stab["pair"] == "lag") & (stab["layer"] == "fc")]
    assert list(zip(lagged["a"], lagged["b"])) == [(0, 2), (2, 3)]


def test_cli_default_lag_on_uneven_snapshots_prints_the_warning(tmp_path: Path):
    path, _ = _run(tmp_path / "run.h5", UNEVEN)
    result = bstab("analyze", path, "-o", tmp_path / "out", "--no-plots", "--no-progress")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: snapshots are unevenly spaced (epochs 1, 2, 5, 10, 20)" in text
    assert "lag reduced from 5 to 4" in text


@pytest.mark.parametrize(
    ("epochs", "steps", "lag", "fragments"),
    [
        # a lag in epochs on a run without epochs: the fix names a lag in steps that fits
        ([np.nan] * 5, [0, 10, 20, 30, 40], "5ep", ["records no epochs", "Pass 50steps"]),
        # the recorder's way: the initial snapshot has epoch 0, the others none
        ([0, np.nan, np.nan], [0, 10, 20], "1ep", ["no epochs (only one snapshot has one)"]),
        # a lag in steps on a run without steps
        ([0, 1, 2, 3], None, "20steps", ["records no steps", "Pass 5ep"]),
        # a lag larger than the run spans
        (UNEVEN, None, "25ep", ["at most the 19 epochs the run spans (epochs 1 to 20)"]),
        ([0, 1, 2], [0, 8, 16], "17steps", ["at most the 16 steps the run spans"]),
        # a lag no two snapshots are apart
        ([0, 10, 20, 30], None, "2ep", ["median 10 epochs apart", "at least 10ep"]),
    ],
)
def test_a_time_lag_the_run_cannot_take_is_one_clean_line(
    tmp_path: Path, epochs, steps, lag: str, fragments: list[str]
):
    path, _ = _run(tmp_path / "run.h5", epochs, steps)
    result = bstab("analyze", path, "-o", tmp_path / "out", "--lag", lag, "--no-progress")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "Expected `--lag`" in line and f"'{lag}'" in line
    assert_clean_failure(result, *fragments)
    # it fails before any SVD: no cache, no output folder
    assert not list(tmp_path.glob("run.h5.bstab-cache*")) and not list(tmp_path.glob("*cache*"))
    assert not (tmp_path / "out" / "plan.json").exists()


@pytest.mark.parametrize(
    ("lag", "fragment"),
    [
        ("5 days", "a number of snapshots (5), epochs (5ep) or steps (200steps)"),
        ("0", "positive"),
        ("0ep", "positive"),
        ("-2steps", "positive"),
        ("1.5", "Pass 1.5ep"),
    ],
)
def test_a_lag_that_is_not_one_is_a_usage_error(tmp_path: Path, lag: str, fragment: str):
    path, _ = _run(tmp_path / "run.h5", [0, 1, 2])
    result = bstab("analyze", path, "--lag", lag, "--no-progress")
    assert result.exit_code == 2
    assert "Invalid value for '--lag'" in one_error_line(result)
    assert_clean_failure(result, fragment)


def test_recorder_run_without_steps_refuses_a_lag_in_steps(tmp_path: Path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Linear(12, 3))
    path = tmp_path / "rec.h5"
    with Recorder(model, path) as rec:  # initial snapshot: step 0, epoch 0
        for epoch in (1, 2, 5):
            rec.snapshot(epoch=epoch)  # no optimizer attached: step -1
    report = analyze(path, AnalysisConfig(lag="2ep"), NO_CACHE)
    assert set(zip(*(_lag_rows(report)[c] for c in ("a", "b")))) == {(0, 2)}  # 0 -> 2 only
    with pytest.raises(ConfigError, match="records no steps") as info:
        analyze(path, AnalysisConfig(lag="20steps"), NO_CACHE)
    assert "Pass " in str(info.value) and "ep or a number of snapshots" in str(info.value)


def test_an_infinite_lag_is_refused_as_not_finite_not_as_not_positive():
    from basis_stability.analysis.lag import Lag
    from basis_stability.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`lag` to be finite but got '1e309ep'"):
        Lag.parse("1e309ep")
