"""`bstab analyze`: the table, the files it writes, --follow, and one clean line for bad input."""

from __future__ import annotations

import importlib
import json
import re
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers.cli import assert_clean_failure, bstab
from helpers.runs import SMALL_LAYERS, small_run

from basis_stability import analyze, open_run
from basis_stability.analysis.output import MANIFEST, PLOTS, TABLES
from basis_stability.recommend.plan import Plan


def _plots_module():
    try:
        return importlib.import_module("basis_stability.plots")
    except ImportError:  # being written elsewhere; its files are then not asserted
        return None


# ---------------------------------------------------------------------- the happy path
def test_analyze_prints_the_table_and_writes_tables_plan_and_plots(mlp_run: Path, tmp_path):
    out = tmp_path / "out"
    result = bstab("analyze", mlp_run, "-o", out, "--lag", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    with open_run(mlp_run) as run:
        names = run.layer_names
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    assert "final S" in lines[header] and "stable rank" in lines[header]
    for i, name in enumerate(names):  # one row per layer, in run order
        assert lines[header + 1 + i].split()[0] == name
    assert "4 snapshots, 3 layers, 12 new SVDs" in result.output
    assert "beta:" in result.output
    api = analyze(mlp_run, *_configs(lag=2))
    for name in TABLES:
        frame = pd.read_csv(out / f"{name}.csv")
        assert len(frame) == len(getattr(api, name)), name
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["layer"].astype(str)) == names
    np.testing.assert_allclose(summary["final_S"], api.summary["final_S"], rtol=1e-12)
    plan = Plan.from_json(out / "plan.json")
    assert plan == api.plan
    # ranks are for the layers OIALR factorises; the 256x10 head (ratio 25.6 > 10) is named
    assert set(plan.ranks) | set(plan.excluded_layers) == set(names)
    assert list(plan.excluded_layers) == [names[-1]] == ["head"]
    written = int(result.output.split("wrote ")[1].split()[0])
    assert written == len([p for p in out.iterdir() if p.name != MANIFEST])
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {
        p.name for p in out.iterdir() if p.name != MANIFEST
    }  # every file written is listed as ours
    if _plots_module() is None:
        return
    for stem in PLOTS:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert "<svg" in (out / f"{stem}.svg").read_text()[:2000], stem


def _configs(lag: int):
    from basis_stability.analysis import AnalysisConfig, EngineConfig

    return AnalysisConfig(lag=lag), EngineConfig(cache=False)


def test_second_run_computes_nothing_and_default_output_is_beside_the_run(mlp_run: Path):
    first = bstab("analyze", mlp_run, "--no-plots", "--no-progress")
    assert first.exit_code == 0, first.output
    second = bstab("analyze", mlp_run, "--no-plots", "--no-progress")
    assert second.exit_code == 0, second.output
    assert "0 new SVDs" in second.output
    out = mlp_run.with_name("mlp-analysis")
    assert (out / "summary.csv").exists() and (out / "plan.json").exists()


def test_no_plots_writes_no_figures(mlp_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = bstab("analyze", mlp_run, "-o", out, "--no-plots", "--no-progress")
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert not {f for f in files if f.endswith((".png", ".svg"))}
    assert {f"{t}.csv" for t in TABLES} | {"plan.json"} <= files


def test_single_snapshot_run_analyses_with_a_note(tmp_path: Path):
    path = tmp_path / "one.h5"
    small_run(path, 1)
    out = tmp_path / "out"
    result = bstab("analyze", path, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "stability needs two" in result.output
    assert "fc" in result.output and "head" in result.output
    stab = pd.read_csv(out / "stability.csv")  # empty, but with its columns
    assert stab.empty and "S" in stab.columns
    assert len(pd.read_csv(out / "ranks.csv")) == 2


# ---------------------------------------------------------------------- --follow
def test_follow_on_a_finished_run_returns_after_one_analysis(mlp_run: Path, tmp_path: Path):
    result = bstab(
        "analyze", mlp_run, "-o", tmp_path / "out", "--follow", "--no-plots", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("new SVDs") == 1
    assert "the writer closed the run" in result.output


def test_follow_waits_for_the_first_snapshot_of_a_live_run(tmp_path: Path):
    path = tmp_path / "live.h5"
    writer = small_run(path, 0, close=False)

    def record_later() -> None:
        time.sleep(0.5)
        rng = np.random.default_rng(1)
        for t in range(3):
            mats = [rng.standard_normal(v.shape).astype(np.float32) for v in SMALL_LAYERS]
            writer.append(iter(mats), step=t, epoch=t)
        writer.close()

    thread = threading.Thread(target=record_later)
    thread.start()
    try:
        result = bstab(
            "analyze", path, "-o", tmp_path / "out", "--follow", "--poll", "0.1",
            "--idle-timeout", "30", "--no-plots", "--no-progress",
        )  # fmt: skip
    finally:
        thread.join()
        writer.close()
    assert result.exit_code == 0, result.output
    assert "the writer closed the run" in result.output
    counts = re.findall(r"^(\d+) snapshots, 2 layers", result.output, flags=re.M)
    assert counts and counts[-1] == "3"  # the last analysis saw every snapshot
    assert (tmp_path / "out" / "plan.json").exists()


def test_follow_with_a_time_lag_waits_until_the_live_run_spans_it(tmp_path: Path):
    from basis_stability.analysis import AnalysisConfig, EngineConfig
    from basis_stability.analysis.follow import follow_analysis
    from basis_stability.recommend.plan import PlanConfig

    path = tmp_path / "live.h5"
    writer = small_run(path, 2, close=False)  # epochs 0, 1: shorter than the 3-epoch lag

    def once():
        return analyze(path, AnalysisConfig(lag="3ep"), EngineConfig(), PlanConfig())

    outputs = follow_analysis(
        path, tmp_path / "out", once, plots=False, follow=True, poll=0.05, idle_timeout=30,
    )  # fmt: skip
    try:
        assert next(outputs).startswith("waiting for the run to span the lag")
        rng = np.random.default_rng(1)
        for t in range(2, 6):  # the generator is paused: append while it waits
            mats = [rng.standard_normal(v.shape).astype(np.float32) for v in SMALL_LAYERS]
            writer.append(iter(mats), step=t, epoch=t)
    finally:
        writer.close()
    rest = list(outputs)
    assert rest[-1] == "the writer closed the run; done."
    stab = pd.read_csv(tmp_path / "out" / "stability.csv")
    lagged = stab[stab["pair"] == "lag"]
    assert set(zip(lagged["a"], lagged["b"])) == {(0, 3), (1, 4), (2, 5)}


def test_a_time_lag_longer_than_a_finished_run_fails_in_one_line(mlp_run: Path, tmp_path: Path):
    result = bstab("analyze", mlp_run, "-o", tmp_path / "out", "--follow", "--lag", "500ep")
    assert_clean_failure(result, "500ep")


# ---------------------------------------------------------------------- bad input
def test_missing_run_fails_cleanly_and_creates_nothing(tmp_path: Path):
    result = bstab("analyze", tmp_path / "nope" / "run.h5", "--no-progress")
    assert_clean_failure(result, "No run file")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["text", "foreign", "empty"])
def test_bad_run_files_fail_cleanly(kind: str, tmp_path: Path):
    path = tmp_path / "bad.h5"
    if kind == "text":
        path.write_text("hello\n")
        fragment = "not an HDF5 file"
    elif kind == "foreign":
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(3)
        fragment = "not a basis_stability run"
    else:
        small_run(path, 0)
        fragment = "no committed snapshot"
    out = tmp_path / "out"
    assert_clean_failure(bstab("analyze", path, "-o", out, "--no-progress"), fragment)
    assert not out.exists()


def test_output_that_is_a_file_names_the_option(mlp_run: Path, tmp_path: Path):
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    assert_clean_failure(bstab("analyze", mlp_run, "-o", taken, "--no-progress"), "--output")
    assert taken.read_text() == "mine\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--svd", "bogus"], "Invalid value for '--svd'"),
        (["--lag", "0"], "Invalid value for '--lag'"),
        (["--tau", "1.5"], "Invalid value for '--tau'"),
        (["--svd-dtype", "float16"], "Invalid value for '--svd-dtype'"),
        (["--method", "qr"], "Invalid value for '--method'"),
        (["--chunk-mb", "0"], "Invalid value for '--chunk-mb'"),
    ],
)
def test_bad_options_are_usage_errors(mlp_run: Path, args: list[str], fragment: str):
    result = bstab("analyze", mlp_run, *args, "--no-progress")
    assert result.exit_code == 2
    assert_clean_failure(result, fragment)


def test_method_svd_and_a_tiny_chunk_give_the_numbers_of_the_default(mlp_run: Path, tmp_path):
    """The SVD route shares nothing with the Gram route but the rules; one snapshot per batch
    changes no bit."""
    outs = {}
    for name, extra in (("gram", []), ("svd", ["--method", "svd"]), ("chunk", ["--chunk-mb", "1"])):
        out = tmp_path / name
        result = bstab("analyze", mlp_run, "-o", out, "--no-plots", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        outs[name] = pd.read_csv(out / "stability.csv")
    np.testing.assert_allclose(outs["svd"]["S"], outs["gram"]["S"], atol=1e-6)
    pd.testing.assert_frame_equal(outs["chunk"], outs["gram"], check_exact=True)
    assert outs["gram"]["S"].notna().all()


def test_bad_device_is_one_clean_line(mlp_run: Path, tmp_path: Path):
    result = bstab("analyze", mlp_run, "-o", tmp_path / "o", "--device", "tpu", "--no-progress")
    assert_clean_failure(result, "`--device`", "`--device cpu`")


def test_parquet_tables_equal_the_csv_tables(mlp_run: Path, tmp_path: Path):
    pytest.importorskip("pyarrow")  # in the [test] extra; Parquet is written only with it
    out = tmp_path / "out"
    assert bstab("analyze", mlp_run, "-o", out, "--no-plots", "--no-progress").exit_code == 0
    for table in TABLES:
        parquet = pd.read_parquet(out / f"{table}.parquet")
        csv = pd.read_csv(out / f"{table}.csv")
        assert list(parquet.columns) == list(csv.columns)
        numeric = parquet.select_dtypes("number").columns
        np.testing.assert_allclose(
            parquet[numeric].to_numpy(float),
            csv[numeric].to_numpy(float),
            rtol=1e-12,
            equal_nan=True,
        )
