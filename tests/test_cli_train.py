"""`bstab train`: the summary line, the run file it records, plans, and clean failures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab, one_error_line

from basis_stability import open_run

FAST = ("--model", "mlp", "--batch-size", "128", "--no-progress")


SUMMARY = re.compile(
    r"^val_acc (?P<acc>[0-9.]+) \| trainable (?P<share>[0-9.]+)% of the full-rank model "
    r"\((?P<fshare>[0-9.]+)% of the factorised layers\) \| (?P<sec>[0-9.]+) s \| "
    r"run (?P<run>\S+?)(, model (?P<model>\S+))?$"
)


def _summary(output: str) -> re.Match:
    matches = [m for m in map(SUMMARY.match, output.splitlines()) if m]
    assert len(matches) == 1, output
    return matches[0]


def _metrics(path: Path) -> tuple[list[str], np.ndarray, int]:
    with open_run(path) as run:
        return run.metric_names, run.metrics_array(), run.n_snapshots


def test_train_auto_prints_one_summary_and_records_the_run(tmp_path):
    out = tmp_path / "run.h5"
    result = bstab("train", *FAST, "--epochs", "3", "-o", out)
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert Path(summary["run"]) == out and out.exists()
    model_path = Path(summary["model"])
    assert model_path == tmp_path / "run-factorized.pt" and model_path.exists()
    assert 0 < float(summary["acc"]) <= 1 and float(summary["sec"]) > 0
    names, values, n = _metrics(out)
    assert n == 4  # initial + 3 epochs
    assert "trainable_share" in names and "val_acc" in names
    # auto mode: 3 epochs are too few to see stable bases (lag 5), so no conversion yet
    assert float(summary["share"]) == 100.0 and not any(m.startswith("rank/") for m in names)
    share = values[-1, names.index("trainable_share")]
    assert share == pytest.approx(float(summary["share"]) / 100, abs=1e-3)
    exported = torch.load(model_path, weights_only=False)
    assert exported(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # ... and it says so, with the steps a check needs (36 steps < 6 checks of 12), in the run too
    lines = [line for line in result.output.splitlines() if "never converted" in line]
    assert lines == [
        "OIALR auto mode never converted in 36 steps: no stability check ran (the first needs "
        "72 steps, lag 5 + 1 checks of 12 steps; converting needs at least 84 steps); "
        "train longer (`--epochs`), or give `--delay` and `--beta`"
    ]
    with open_run(out) as run:
        events = run.events()
    # the run file keeps the library's words (Python names); the CLI prints its flags
    assert events[-1]["event"] == "never-converted" and _as_flags(events[-1]["message"]) == lines[0]
    assert events[-1]["step"] == 36 and events[-1]["checks"] == 0


def test_auto_run_that_checks_but_never_converts_prints_the_last_stable_share(tmp_path):
    out = tmp_path / "run.h5"
    result = bstab("train", *FAST, "--epochs", "7", "--lr", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    assert float(_summary(result.output)["share"]) == 100.0, "the run converted: raise --lr"
    with open_run(out) as run:
        events = run.events()
    checks = [e for e in events if e["event"] == "check"]
    assert [e["step"] for e in checks] == [72, 84]  # lag 5: from the 6th epoch on
    (line,) = [line for line in result.output.splitlines() if "never converted" in line]
    assert f"last stable share {checks[-1]['stable_share']:.2f} " in line
    assert "after 2 checks; it needs 0.90 for 2 checks in a row at S >= 0.99" in line
    assert events[-1]["event"] == "never-converted" and _as_flags(events[-1]["message"]) == line


def _as_flags(message: str) -> str:
    for name in ("epochs", "delay", "beta"):
        message = message.replace(f"`{name}`", f"`--{name}`")
    return message


def test_train_full_mode(tmp_path):
    out = tmp_path / "full.h5"
    result = bstab("train", *FAST, "--epochs", "2", "--mode", "full", "-o", out)
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert summary["model"] is None and float(summary["share"]) == 100.0
    names, _, n = _metrics(out)
    assert n == 3 and not any(name.startswith("rank/") for name in names)


def test_train_with_explicit_delay_beta_interval_cuts_ranks(tmp_path):
    out = tmp_path / "low.h5"
    # beta 0.5: at 0.2 the freshly initialised layers keep too many values for factors to pay
    args = ("--epochs", "3", "--delay", "1", "--beta", "0.5", "--interval", "1")
    result = bstab("train", *FAST, *args, "-o", out)
    assert result.exit_code == 0, result.output
    share = float(_summary(result.output)["share"])
    assert share < 100.0
    names, values, _ = _metrics(out)
    ranks = values[:, names.index("rank/fc2")]
    assert {"rank/fc1", "rank/fc2"} <= set(names) and "rank/head" not in names  # 256x10 head: full
    assert np.isnan(ranks[0]) and ranks[-1] < 256  # full-rank at first, cut by the end
    assert np.all(np.diff(ranks[~np.isnan(ranks)]) <= 0)
    assert values[-1, names.index("trainable_share")] == pytest.approx(share / 100, abs=1e-3)


def test_no_auto_without_delay_or_beta_is_an_error_not_a_silent_auto_run(tmp_path):
    out = tmp_path / "x.h5"
    result = bstab("train", *FAST, "--epochs", "3", "--no-auto", "-o", out)
    line = one_error_line(result)
    for name in ("--no-auto", "--delay", "--beta", "--plan", "drop `--no-auto`"):
        assert name in line, line
    assert not out.exists()


def test_no_auto_with_delay_and_beta_trains_the_fixed_schedule(tmp_path):
    out = tmp_path / "fixed.h5"
    args = ("--epochs", "3", "--no-auto", "--delay", "5steps", "--beta", "0.2")
    result = bstab("train", *FAST, *args, "-o", out)
    assert result.exit_code == 0, result.output
    assert "never converted" not in result.output
    with open_run(out) as run:
        events = run.events()
    kinds = [e["event"] for e in events]
    assert "check" not in kinds and "auto-decision" not in kinds
    convert = next(e for e in events if e["event"] == "convert")
    assert convert["step"] == 5 and convert["beta"] == 0.2


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plan")
    run = folder / "mlp.h5"
    result = bstab("record", *FAST, "--epochs", "4", "-o", run)
    assert result.exit_code == 0, result.output
    result = bstab("analyze", run, "-o", folder / "an", "--lag", "1", "--no-plots", "--no-progress")
    assert result.exit_code == 0, result.output
    return folder / "an" / "plan.json"


def test_train_with_a_plan_of_the_same_model(mlp_plan, tmp_path):
    import json

    plan = json.loads(mlp_plan.read_text())
    assert plan["delay_step"] is not None, "the recorded run did not stabilise"
    out = tmp_path / "planned.h5"
    result = bstab("train", *FAST, "--epochs", "6", "--plan", mlp_plan, "-o", out)
    assert result.exit_code == 0, result.output
    assert float(_summary(result.output)["share"]) < 100.0  # converted at the plan's delay
    names, values, _ = _metrics(out)
    converted = ~np.isnan(values[:, names.index("rank/fc2")])
    first = int(np.argmax(converted))  # the first snapshot (epoch) after conversion
    assert first == int(np.ceil(plan["delay_step"] / 12))  # 12 steps per epoch at batch 128


def test_train_with_a_plan_of_another_model_fails_cleanly(mlp_plan, tmp_path):
    result = bstab(
        "train", "--model", "cnn", "--epochs", "4", "--no-progress", "--plan", mlp_plan,
        "-o", tmp_path / "x.h5",
    )  # fmt: skip
    assert_clean_failure(result, "plan")
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--beta", "1.5"), "--beta"),
        (("--delay", "1", "--interval", "0"), "--interval"),
        (("--delay", "500"), "delay"),
        (("--delay", "abc"), "--delay"),
        (("--auto", "--delay", "1"), "--auto"),
        (("--plan", "nope.json", "--delay", "1"), "--plan"),
        (("--target-share", "0.2", "--delay", "1"), "--target-share"),
    ],
)
def test_bad_input_fails_cleanly(args, fragment, tmp_path):
    out = tmp_path / "bad.h5"
    result = bstab("train", *FAST, "--epochs", "3", *args, "-o", out)
    assert_clean_failure(result, fragment)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "taken.h5"
    out.write_bytes(b"keep me")
    result = bstab("train", *FAST, "--epochs", "1", "-o", out)
    assert_clean_failure(result, "already exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_an_existing_factorised_model_is_refused_before_training(tmp_path):
    out, model = tmp_path / "new.h5", tmp_path / "new-factorized.pt"
    model.write_bytes(b"an earlier model")
    result = bstab("train", *FAST, "--epochs", "1", "-o", out)
    assert_clean_failure(result, str(model), "already exists", "--force", "nothing was written")
    assert model.read_bytes() == b"an earlier model" and not out.exists()
    forced = bstab("train", *FAST, "--epochs", "1", "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert torch.load(model, weights_only=False)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_without_output_a_taken_model_name_moves_the_run_to_the_next_free_name(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    stem = "train-oialr-mlp-digits-seed0"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{stem}-factorized.pt").write_bytes(b"keep")
    result = bstab("train", *FAST, "--epochs", "1")
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert Path(summary["run"]) == Path("runs") / f"{stem}-2.h5"
    assert Path(summary["model"]) == Path("runs") / f"{stem}-2-factorized.pt"
    assert (tmp_path / "runs" / f"{stem}-factorized.pt").read_bytes() == b"keep"


def test_layers_kept_dense_are_named_in_one_line(tmp_path):
    # beta 0.2 right after initialisation keeps most values: no factors would pay
    out = tmp_path / "dense.h5"
    args = ("--epochs", "2", "--delay", "1", "--beta", "0.2", "--interval", "1")
    result = bstab("train", *FAST, *args, "-o", out)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("OIALR kept")]
    assert len(lines) == 1, result.output
    assert "kept 2 of 2 eligible layers dense" in lines[0] and "(k (m + n) >= m n)" in lines[0]
    assert "fc1 (256x64: beta rank" in lines[0] and "> 51, the largest paying" in lines[0]
    assert float(_summary(result.output)["share"]) == 100.0  # counted whole
    with open_run(out) as run:
        convert = next(e for e in run.events() if e["event"] == "convert")
    assert convert["dense"] == ["fc1", "fc2"] and convert["layers"] == 0
