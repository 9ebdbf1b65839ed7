"""Analysing a run once or while it grows (analysis/follow.py): one analysis per new snapshot,
each written over the last, and following ends for the reason it says."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers.runs import small_run, small_snapshots

import basis_stability as bs
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis.follow import follow_analysis
from basis_stability.analysis.lag import LagTooLongError
from basis_stability.analysis.output import MANIFEST
from basis_stability.errors import ConfigError

FAST = {"poll": 0.02, "idle_timeout": 30.0, "plots": False}


class Counted:
    """``bs.analyze`` of one run, counting its calls and keeping each report."""

    def __init__(self, path: Path, lag: int | str = 1) -> None:
        self.path, self.lag, self.reports = path, lag, []

    def __call__(self):
        report = bs.analyze(
            self.path, AnalysisConfig(lag=self.lag), engine=EngineConfig(cache=False)
        )
        self.reports.append(report)
        return report


def _append(writer, t: int) -> None:
    writer.append(iter(small_snapshots(1, seed=100 + t)[0]), step=t, epoch=t)


def _written(text: str) -> int:
    return int(text.rsplit("wrote ", 1)[1].split()[0])


# ---------------------------------------------------------------------- once
def test_without_follow_one_analysis_is_written_and_its_text_yielded(tiny_run, tmp_path: Path):
    out = tmp_path / "out"
    analyze = Counted(tiny_run)
    texts = list(follow_analysis(tiny_run, out, analyze, **FAST))
    assert len(texts) == 1 and len(analyze.reports) == 1
    report = analyze.reports[0]
    assert texts[0].startswith(report.text())
    assert texts[0].endswith(f"files to {out}")
    assert _written(texts[0]) == len([p for p in out.iterdir() if p.name != MANIFEST])


def test_following_a_closed_run_stops_after_one_analysis(tiny_run, tmp_path: Path):
    analyze = Counted(tiny_run)
    texts = list(follow_analysis(tiny_run, tmp_path / "out", analyze, follow=True, **FAST))
    assert len(analyze.reports) == 1
    assert texts[-1] == "the writer closed the run; done." and len(texts) == 2


# ---------------------------------------------------------------------- a run that grows
def test_a_growing_run_is_analysed_again_for_each_new_snapshot(tmp_path: Path):
    path, out = tmp_path / "live.h5", tmp_path / "out"
    writer = small_run(path, 2, close=False)
    analyze = Counted(path)
    texts = follow_analysis(path, out, analyze, follow=True, **FAST)
    try:
        assert "2 snapshots" in next(texts)
        for t in (2, 3):
            _append(writer, t)
            assert f"{t + 1} snapshots" in next(texts)
            ranks = pd.read_csv(out / "ranks.csv")  # the files of this analysis, not the last
            assert sorted(set(ranks["snapshot"])) == list(range(t + 1))
            assert len(ranks) == len(analyze.reports[-1].ranks)
    finally:
        writer.close()
    assert next(texts) == "the writer closed the run; done."
    assert [r.n_snapshots for r in analyze.reports] == [2, 3, 4]  # one analysis per snapshot
    with pytest.raises(StopIteration):
        next(texts)


def test_a_writer_that_goes_quiet_ends_the_follow_after_the_idle_timeout(tmp_path: Path):
    path = tmp_path / "live.h5"
    writer = small_run(path, 2, close=False)
    try:
        cfg = {**FAST, "idle_timeout": 0.1}
        texts = list(follow_analysis(path, tmp_path / "out", Counted(path), follow=True, **cfg))
    finally:
        writer.close()
    assert texts[-1] == "no new snapshot for 0.1 s; stopping." and len(texts) == 2


def test_a_live_run_shorter_than_a_time_lag_is_waited_for_until_it_spans_it(tmp_path: Path):
    path, out = tmp_path / "live.h5", tmp_path / "out"
    writer = small_run(path, 2, close=False)  # epochs 0 and 1 span 1 epoch of the 3 asked for
    analyze = Counted(path, lag="3ep")
    texts = follow_analysis(path, out, analyze, follow=True, **FAST)
    try:
        for t in (2, 3):
            assert next(texts).startswith("waiting for the run to span the lag")
            assert not out.exists() or not (out / "summary.csv").exists()
            _append(writer, t)
        text = next(texts)
        assert "4 snapshots" in text and (out / "summary.csv").exists()
    finally:
        writer.close()
    stability = analyze.reports[-1].stability
    lag_pairs = stability[stability["pair"] == "lag"]
    assert set(zip(lag_pairs["a"], lag_pairs["b"])) == {(0, 3)}  # epochs 3 apart


def test_a_closed_run_shorter_than_the_lag_raises_at_once(tiny_run, tmp_path: Path):
    texts = follow_analysis(tiny_run, tmp_path / "out", Counted(tiny_run, lag="50ep"), **FAST)
    with pytest.raises(LagTooLongError):
        next(texts)


# ---------------------------------------------------------------------- nothing to write
def test_a_bad_output_folder_fails_before_any_analysis(tiny_run, tmp_path: Path):
    (tmp_path / "taken").write_text("")
    analyze = Counted(tiny_run)
    with pytest.raises(ConfigError, match="is a file"):
        next(follow_analysis(tiny_run, tmp_path / "taken", analyze, **FAST))
    assert analyze.reports == []  # no SVD paid for


def test_a_rank_that_does_not_write_yields_nothing(tiny_run, tmp_path: Path):
    out = tmp_path / "out"
    assert list(follow_analysis(tiny_run, out, lambda: None, follow=True, **FAST)) == []
    assert not out.exists()
