"""Writing a report to a folder (analysis/output.py): the tables read back equal the report's
frames, the manifest holds each file's sha256, and a file that is not ours is never replaced
without ``force``."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.runs import SMALL_LAYERS

import basis_stability as bs
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis import output as output_mod
from basis_stability.analysis.output import (
    MANIFEST,
    PLOTS,
    TABLES,
    check_dir,
    output_names,
    write_report,
    write_tables,
)
from basis_stability.errors import ConfigError, RunFileError

PARQUET = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="module")
def report(tiny_run_file):
    return bs.analyze(tiny_run_file, AnalysisConfig(lag=2), engine=EngineConfig(cache=False))


def _assert_read_back_equal(read: pd.DataFrame, frame: pd.DataFrame, name: str) -> None:
    """A CSV read back is the frame: same columns and rows; numbers to the last digit CSV
    keeps, strings the same (an empty string reads back as NaN)."""
    assert list(read.columns) == list(frame.columns), name
    assert len(read) == len(frame), name
    for col in frame.columns:
        want = frame[col]
        if pd.api.types.is_numeric_dtype(want) and not pd.api.types.is_bool_dtype(want):
            got = read[col].to_numpy(dtype=float)
            np.testing.assert_allclose(
                got, want.to_numpy(dtype=float), rtol=1e-12, equal_nan=True, err_msg=f"{name}.{col}"
            )
        else:
            assert _strings(read[col]) == _strings(want), f"{name}.{col}"


def _strings(column: pd.Series) -> list[str]:
    return ["" if pd.isna(v) else str(v) for v in column]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- tables
def test_written_csvs_read_back_equal_to_the_frames(report, tmp_path: Path):
    paths = write_tables(report, tmp_path)
    assert [p.name for p in paths if p.suffix == ".csv"] == [f"{t}.csv" for t in TABLES]
    for name in TABLES:
        frame = getattr(report, name)
        assert len(frame), name  # a 4-snapshot run fills every table
        _assert_read_back_equal(pd.read_csv(tmp_path / f"{name}.csv"), frame, name)
        if PARQUET:
            pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{name}.parquet"), frame)


def test_the_ranks_csv_holds_numpys_stable_rank_of_the_known_weights(
    report, tiny_snapshots, tmp_path: Path
):
    write_tables(report, tmp_path)
    ranks = pd.read_csv(tmp_path / "ranks.csv")
    layers = [v.name for v in SMALL_LAYERS]
    assert len(ranks) == len(tiny_snapshots) * len(layers)
    for row in ranks.itertuples():
        w = tiny_snapshots[row.snapshot][layers.index(row.layer)].astype(np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        assert row.stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-6)


def test_output_names_are_the_tables_the_plan_and_the_plots_asked_for():
    tables = [f"{t}.csv" for t in TABLES] + ([f"{t}.parquet" for t in TABLES] if PARQUET else [])
    assert sorted(output_names(plots=False)) == sorted([*tables, "plan.json"])
    with_plots = output_names(plots=True, formats=("png",))
    assert sorted(with_plots) == sorted([*tables, "plan.json", *(f"{p}.png" for p in PLOTS)])


# ---------------------------------------------------------------------- the whole report
def test_write_report_lists_every_file_with_its_sha256(report, tmp_path: Path):
    out = tmp_path / "out"
    paths = write_report(report, out, plots=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == {p.name: _sha256(p) for p in paths}
    assert {p.name for p in out.iterdir()} == {*manifest["files"], MANIFEST}
    assert "plan.json" in manifest["files"]
    assert bs.Plan.from_json(out / "plan.json") == report.plan


def test_plots_are_written_as_asked_and_listed(report, tmp_path: Path):
    paths = write_report(report, tmp_path, plots=True, formats=("png",))
    pngs = sorted(p.stem for p in paths if p.suffix == ".png")
    assert pngs == sorted(PLOTS)  # 4 snapshots and a plan: every figure
    for stem in PLOTS:
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
    assert not list(tmp_path.glob("*.svg"))


def test_a_rerun_replaces_our_own_unchanged_outputs(report, tmp_path: Path):
    write_report(report, tmp_path, plots=False)
    before = _sha256(tmp_path / "summary.csv")
    (tmp_path / "keep.txt").write_text("mine\n")
    write_report(report, tmp_path, plots=False)  # no error: they are ours
    assert _sha256(tmp_path / "summary.csv") == before
    assert (tmp_path / "keep.txt").read_text() == "mine\n"  # other files are left alone


# ---------------------------------------------------------------------- refusing to overwrite
def test_a_file_of_the_users_named_like_an_output_is_refused_untouched(report, tmp_path: Path):
    (tmp_path / "ranks.csv").write_text("my ranks\n")
    with pytest.raises(ConfigError, match="ranks.csv.*force"):
        write_report(report, tmp_path, plots=False)
    assert (tmp_path / "ranks.csv").read_text() == "my ranks\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.csv"]  # nothing written
    write_report(report, tmp_path, plots=False, force=True)
    _assert_read_back_equal(pd.read_csv(tmp_path / "ranks.csv"), report.ranks, "ranks")


def test_our_output_changed_since_is_no_longer_ours(report, tmp_path: Path):
    write_report(report, tmp_path, plots=False)
    (tmp_path / "plan.json").write_text("{}\n")
    with pytest.raises(ConfigError, match="plan.json"):
        write_report(report, tmp_path, plots=False)
    assert (tmp_path / "plan.json").read_text() == "{}\n"


def test_a_foreign_manifest_is_refused(report, tmp_path: Path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "someone-else", "files": {}}))
    with pytest.raises(ConfigError, match=MANIFEST.replace(".", r"\.")):
        check_dir(tmp_path, plots=False)


def test_many_clashes_are_counted_not_all_listed(tmp_path: Path):
    names = output_names(plots=True)
    for name in names:
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=rf"\.\.\. \({len(names)} in all\)"):
        check_dir(tmp_path)


def test_check_dir_creates_nothing_and_refuses_a_file(tmp_path: Path):
    missing = tmp_path / "a" / "b"
    assert check_dir(missing) == missing and not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_dir(tmp_path / "f")


# ---------------------------------------------------------------------- failing writes
@pytest.mark.parametrize(
    ("code", "error", "fragment"),
    [(errno.ENOSPC, RunFileError, "Free space"), (errno.EROFS, ConfigError, "Choose another")],
)
def test_a_failing_write_is_one_error_naming_the_folder(
    report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code, error, fragment
):
    def fail(report, out):
        raise OSError(code, "the disk says no", str(out / "summary.csv"))

    monkeypatch.setattr(output_mod, "write_tables", fail)
    with pytest.raises(error) as caught:
        write_report(report, tmp_path / "out", plots=False)
    text = str(caught.value)
    assert str(tmp_path / "out") in text and "the disk says no" in text and fragment in text
