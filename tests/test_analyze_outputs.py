"""What `bstab analyze` writes and where: it never overwrites a user's files, a read-only folder is
one clear line, a layer with NaN weights throughout is reported for what it is, and a run without
layers is a clear error, not a ZeroDivisionError."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab
from helpers.mounts import tmpfs
from helpers.runs import SMALL_LAYERS, small_run
from torch import nn

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis import output as output_mod
from basis_stability.analysis import report as report_mod
from basis_stability.analysis.follow import follow_analysis
from basis_stability.analysis.output import MANIFEST, TABLES
from basis_stability.errors import ConfigError, RunFileError
from basis_stability.recommend.plan import PlanConfig, plan_from
from basis_stability.recording import Recorder
from basis_stability.store import RunWriter


# ---------------------------------------------------------------------- the user's own files
@pytest.mark.parametrize("name", ["plan.json", "summary.csv"])
def test_user_file_with_an_output_name_survives_without_force(
    tiny_run: Path, tmp_path: Path, name: str
):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my own notes\n")
    (out / "keep.txt").write_text("unrelated\n")
    result = bstab("analyze", tiny_run, "-o", out, "--no-plots", "--no-progress")
    assert_clean_failure(result, name, "`--force`", "another `--output`")
    assert (out / name).read_text() == "my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "keep.txt"])  # nothing written
    assert "new SVDs" not in result.output  # refused before any SVD was paid for


def test_our_own_outputs_are_replaced_on_a_rerun(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = bstab("analyze", tiny_run, "-o", out, "--lag", "2", "--no-progress")
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert {f"{t}.csv" for t in TABLES} | {"plan.json", "stable_rank.png"} <= set(manifest["files"])
    before = (out / "summary.csv").read_text()
    second = bstab("analyze", tiny_run, "-o", out, "--lag", "3", "--no-progress")
    assert second.exit_code == 0, second.output
    lag3 = pd.read_csv(out / "stability.csv")
    assert set(lag3.loc[lag3["pair"] == "lag", "lag"]) == {3}  # really rewritten
    assert (out / "summary.csv").read_text() != before
    written = int(second.output.split("wrote ")[1].split()[0])
    assert written == len([p for p in out.iterdir() if p.name != MANIFEST])


def test_our_output_edited_by_the_user_is_theirs_then(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert bstab("analyze", tiny_run, "-o", out, "--no-plots", "--no-progress").exit_code == 0
    (out / "plan.json").write_text('{"mine": true}\n')
    result = bstab("analyze", tiny_run, "-o", out, "--no-plots", "--no-progress")
    assert_clean_failure(result, "plan.json", "--force")
    assert (out / "plan.json").read_text() == '{"mine": true}\n'


def test_force_overwrites_the_user_files(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("mine\n")
    result = bstab("analyze", tiny_run, "-o", out, "--no-plots", "--force", "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "plan.json").read_text())["beta"] > 0
    again = bstab("analyze", tiny_run, "-o", out, "--no-plots", "--no-progress")
    assert again.exit_code == 0, again.output  # and from then on they are ours


def test_follow_rewrites_its_own_outputs_each_time(tmp_path: Path):
    path, out = tmp_path / "live.h5", tmp_path / "out"
    writer = small_run(path, 3, close=False)
    cfgs = (AnalysisConfig(lag=1), EngineConfig(cache=False), PlanConfig())
    texts = follow_analysis(
        path, out, lambda: analyze(path, *cfgs), plots=False, follow=True, poll=0.1
    )
    try:
        assert next(texts).count("3 snapshots") == 1
        rng = np.random.default_rng(5)
        writer.append(
            iter(rng.standard_normal(v.shape).astype(np.float32) for v in SMALL_LAYERS),
            step=3,
            epoch=3,
        )
        assert "4 snapshots" in next(texts)  # a second write into the same folder
        assert pd.read_csv(out / "ranks.csv")["snapshot"].max() == 3
    finally:
        writer.close()
    assert "the writer closed the run" in next(texts)


# ---------------------------------------------------------------------- unwritable folders
@pytest.mark.parametrize("below", [False, True])
def test_read_only_output_folder_is_one_clear_line(tiny_run: Path, tmp_path: Path, below: bool):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        out = ro / "out" if below else ro
        result = bstab("analyze", tiny_run, "-o", out, "--no-progress")
        assert_clean_failure(result, "--output", str(out), "read-only", "another `--output`")
        assert "new SVDs" not in result.output


def test_write_failing_after_the_check_names_the_folder(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        monkeypatch.setattr(output_mod.os, "access", lambda *a, **k: True)  # the check passes
        report = analyze(tiny_run, AnalysisConfig(lag=2), EngineConfig(cache=False))
        with pytest.raises(ConfigError) as caught:
            output_mod.write_report(report, ro, plots=False)
        text = str(caught.value)
        assert str(ro) in text and "Read-only file system" in text and "another `out_dir`" in text


# ---------------------------------------------------------------------- NaN weights throughout
def _nan_layer_runs(tmp_path: Path) -> tuple[Path, Path]:
    """One run of a model whose first Linear is NaN throughout, and one of its other layer only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    both, clean = tmp_path / "nan.h5", tmp_path / "clean.h5"
    with Recorder(model, both) as rec, Recorder(model, clean, include=["2"]) as only:
        assert [v.name for v in rec.views] == ["0", "2"]
        assert [v.name for v in only.views] == ["2"]
        for epoch in range(1, 6):
            with torch.no_grad():
                model[2].weight.add_(0.05 * torch.randn_like(model[2].weight))
            rec.snapshot(epoch=epoch)
            only.snapshot(epoch=epoch)
    return both, clean


@pytest.mark.parametrize("plots", [True, False])
def test_all_nan_layer_is_named_and_the_other_layers_are_right(tmp_path: Path, plots: bool):
    both, clean = _nan_layer_runs(tmp_path)
    out = tmp_path / "out"
    args = ["analyze", both, "-o", out, "--lag", "2", "--no-progress"]
    result = bstab(*args, *([] if plots else ["--no-plots"]))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "layer 0: NaN/Inf weights in every snapshot" in text
    assert "layer(s) 0 have NaN/Inf weights in every snapshot" in text
    assert "approximate" not in text
    if plots:
        for stem in ("stability_heatmap", "spectrum_largest_layer", "stable_rank"):
            assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
    got = analyze(both, AnalysisConfig(lag=2), EngineConfig(cache=False))
    want = analyze(clean, AnalysisConfig(lag=2), EngineConfig(cache=False))
    for name in ("stability", "spectra", "ranks"):
        frame = getattr(got, name)
        mine = frame[frame["layer"] == "2"].reset_index(drop=True)
        cols = [c for c in mine.columns if c in getattr(want, name).columns]
        pd.testing.assert_frame_equal(mine[cols], getattr(want, name)[cols], obj=name)
    nan_rows = got.stability[got.stability["layer"] == "0"]
    assert len(nan_rows) and nan_rows["S"].isna().all()
    assert nan_rows["reason"].str.contains("NaN").all()
    assert got.plan is None


# ---------------------------------------------------------------------- no layers
def test_run_without_layers_is_a_clear_error_not_a_zero_division(tmp_path: Path):
    fake = types.SimpleNamespace(path=tmp_path / "run.h5", n_snapshots=3, layers=[])
    with pytest.raises(RunFileError, match="records no layer weights"):
        report_mod.check_analysable(fake)
    path = tmp_path / "empty.h5"
    try:
        with RunWriter.create(path, [], model_class="Toy") as w:
            w.append(iter([]), step=0, epoch=0)
            w.append(iter([]), step=1, epoch=1)
    except RunFileError:  # the writer may refuse a run without layers itself
        return
    except Exception as exc:  # anything else from the writer is not this test's business
        pytest.skip(f"cannot write a run without layers: {exc!r}")
    assert_clean_failure(bstab("analyze", path, "-o", tmp_path / "out", "--no-progress"), "layer")
    with pytest.raises(RunFileError, match="layer"):
        analyze(path, engine=EngineConfig(cache=False))


def test_plan_over_zero_parameters_is_no_plan():
    network = pd.DataFrame(columns=["snapshot", "epoch", "step", "mean_S", "weighted_S"])
    inputs = report_mod.PlanInputs({}, {}, None, None, None, {0: {}}, False, "Toy")
    plan, curve = plan_from(network, inputs, PlanConfig())
    assert plan is None and curve.empty
