"""The co2 forecasting task: its windows, the forecaster, MSE reporting, and mismatched pairs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab, one_error_line

from basis_stability import open_run
from basis_stability.cli import _options
from basis_stability.errors import ConfigError
from basis_stability.jobs import RecordJob, run_record_job
from basis_stability.training.loop import TrainConfig, evaluate, fit
from basis_stability.zoo import DATASETS, MODELS, build_model, load_dataset
from basis_stability.zoo import datasets as zd
from basis_stability.zoo import models as zm

L, H = zd.CO2_INPUT, zd.CO2_HORIZON


def _interpolate(values: np.ndarray) -> np.ndarray:
    """Linear interpolation written out point by point (ends held at the nearest value)."""
    out = values.astype(np.float64).copy()
    known = [i for i in range(len(values)) if not np.isnan(values[i])]
    for i in range(len(values)):
        if not np.isnan(values[i]):
            continue
        before = [k for k in known if k < i]
        after = [k for k in known if k > i]
        if not before:
            out[i] = values[after[0]]
        elif not after:
            out[i] = values[before[-1]]
        else:
            a, b = before[-1], after[0]
            out[i] = values[a] + (values[b] - values[a]) * (i - a) / (b - a)
    return out


def _series(n: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = 300 + np.cumsum(rng.normal(size=n)) + 3 * np.sin(np.arange(n) / 5)
    values[[0, 7, 8, 9, 40, n - 1]] = np.nan  # a leading, an inner run, a trailing gap
    return values


def test_windows_match_an_independent_numpy_construction():
    series = _series()
    n, length, horizon, share = len(series), 6, 3, 0.25
    w = zd.make_windows(series, length, horizon, share)
    cut = n - 30
    assert w.cut == cut
    filled = np.concatenate([_interpolate(series[:cut]), _interpolate(series)[cut:]])
    mean, std = filled[:cut].mean(), filled[:cut].std()
    assert (w.mean, w.std) == pytest.approx((mean, std), rel=1e-12)
    z = (filled - mean) / std
    every = np.lib.stride_tricks.sliding_window_view(z, length + horizon)  # row j starts at j
    first_target = np.arange(len(every)) + length
    train = first_target + horizon <= cut  # every value of the window in the training part
    val = first_target >= cut  # every target in the validation part
    np.testing.assert_allclose(w.x_train, every[train, :length], rtol=1e-6)
    np.testing.assert_allclose(w.y_train, every[train, length:], rtol=1e-6)
    np.testing.assert_allclose(w.x_val, every[val, :length], rtol=1e-6)
    np.testing.assert_allclose(w.y_val, every[val, length:], rtol=1e-6)
    assert len(w.x_train) == cut - length - horizon + 1 and len(w.x_val) == n - cut - horizon + 1
    # chronological: origins step by one, all training windows before all validation ones
    np.testing.assert_array_equal(w.starts_train, first_target[train])
    np.testing.assert_array_equal(w.starts_val, first_target[val])
    assert (np.diff(w.starts_train) == 1).all() and (np.diff(w.starts_val) == 1).all()
    # no validation target is a training input or target; validation inputs reach back into
    # the training part by at most L points (the known past, allowed by the definition)
    seen = {t + k for t in w.starts_train for k in range(-length, horizon)}
    val_targets = {t + k for t in w.starts_val for k in range(horizon)}
    assert max(seen) == cut - 1 and min(val_targets) == cut and not seen & val_targets
    assert min(w.starts_val) - length == cut - length


def test_normalisation_and_gap_filling_use_the_training_part_only():
    series = _series()
    base = zd.make_windows(series, 6, 3, 0.25)
    changed = series.copy()
    changed[base.cut :] = changed[base.cut :] * 10 + 500  # a different future
    w = zd.make_windows(changed, 6, 3, 0.25)
    assert (w.mean, w.std) == (base.mean, base.std)
    np.testing.assert_array_equal(w.x_train, base.x_train)
    np.testing.assert_array_equal(w.y_train, base.y_train)
    assert not np.allclose(w.y_val, base.y_val)
    # a gap at the end of the training part is held at its last measured value, not
    # interpolated towards the first validation value
    gap = series.copy()
    gap[base.cut - 1] = np.nan
    a = zd.make_windows(gap, 6, 3, 0.25)
    assert a.y_train[-1, -1] * a.std + a.mean == pytest.approx(series[base.cut - 2])
    assert series[base.cut] != pytest.approx(series[base.cut - 2])


def test_windows_refuse_a_series_too_short():
    with pytest.raises(ConfigError, match="room for windows"):
        zd.make_windows(np.arange(20.0), 10, 8, 0.2)


def test_co2_dataset_from_statsmodels():
    from statsmodels.datasets import co2

    raw = co2.load_pandas().data["co2"].to_numpy()
    data = load_dataset("co2")
    assert data.task == zd.TASKS["co2"] == "regression" and data.unit == "ppm"
    assert data.x_train.shape == (1768, 1, L) and data.y_train.shape == (1768, H)
    assert data.x_test.shape == (450, 1, L) and data.y_test.shape == (450, H)
    assert data.num_classes == H and data.input_shape == (1, L)
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    cut = 1827
    assert len(raw) == 2284 and np.isnan(raw).sum() == 59
    mean = np.nanmean(raw[:cut])  # the filled mean is close to the measured one
    std = data.scale
    # the first target of each validation window is the measured value (where measured)
    first = data.y_test[:, 0].double().numpy() * std
    measured = ~np.isnan(raw[cut : cut + 450])
    offset = raw[cut : cut + 450][measured] - first[measured]
    np.testing.assert_allclose(offset, offset[0], atol=1e-4)  # one constant: the train mean
    assert offset[0] == pytest.approx(mean, abs=0.5)
    # standardised with training statistics: the validation part lies above the training mean
    assert data.y_test.mean() > 1.0 and abs(float(data.x_train[:, 0, 0].mean())) < 0.2


def test_forecaster_shape_layers_and_shift_equivariance():
    model = build_model("forecaster", (1, L), H, seed=0)
    x = torch.randn(5, 1, L)
    out = model(x)
    assert out.shape == (5, H)
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(mha) == 2 and all(m.batch_first for m in mha)
    from basis_stability.views import select_layers

    kinds = {v.kind for v in select_layers(model).views}
    assert "mha" in kinds and "linear" in kinds, kinds
    # the window's last value is subtracted and added back: a level shift passes through
    torch.testing.assert_close(model(x + 3.0), out + 3.0, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    with pytest.raises(ConfigError, match=r"\(1, L\)"):
        build_model("forecaster", (1, 8, 8), 10)


def test_regression_evaluate_is_the_mse():
    model = build_model("forecaster", (1, L), H, seed=1)
    x, y = torch.randn(37, 1, L), torch.randn(37, H)
    loss, metric = evaluate(model, x, y, batch_size=10, task="regression")
    with torch.no_grad():
        want = ((model(x) - y) ** 2).mean().item()
    assert loss == metric == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="task"):
        evaluate(model, x, y, task="ranking")


def test_short_training_beats_the_naive_forecasts():
    data = load_dataset("co2")
    x, y = data.x_test[:, 0].double(), data.y_test.double()
    last_value = ((x[:, -1:].expand(-1, H) - y) ** 2).mean().item()
    seasonal = ((x[:, :H] - y) ** 2).mean().item()  # the value 52 weeks before each target
    torch.manual_seed(0)
    model = build_model("forecaster", data.input_shape, data.num_classes, seed=0)
    history = fit(model, data, TrainConfig(epochs=3, seed=0), progress=False)
    assert set(history[-1]) == {"loss", "mse", "val_loss", "val_mse", "val_rmse_orig", "lr"}
    val = history[-1]["val_mse"]
    assert val < 0.5 * last_value and val < seasonal, (val, last_value, seasonal)
    assert history[-1]["val_rmse_orig"] == pytest.approx(np.sqrt(val) * data.scale)


def test_record_job_reports_mse(tmp_path):
    job = RecordJob(model="forecaster", dataset="co2", train=TrainConfig(epochs=2, batch_size=128))
    result = run_record_job(job, tmp_path / "run.h5", progress=False)
    name, value = result.metric
    assert name == "val_mse" and value == result.history[-1]["val_mse"] > 0
    assert re.fullmatch(r"val_mse [0-9.e-]+ \(standardised; RMSE [0-9.]+ ppm\)", result.summary())
    with open_run(tmp_path / "run.h5") as run:
        assert "val_mse" in run.metric_names and "val_acc" not in run.metric_names
        assert run.config["metadata"]["job"]["task"] == "regression"
        assert any(layer.name.startswith("blocks.") for layer in run.layers)


def test_cli_record_reports_mse(tmp_path):
    out = tmp_path / "rec.h5"
    result = bstab(
        "record", "--model", "forecaster", "--dataset", "co2", "--epochs", "1", "--no-progress",
        "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "val_mse" in result.output and "val_acc" not in result.output


def test_cli_train_oialr_reports_mse_and_factorises_attention(tmp_path):
    out = tmp_path / "train.h5"
    result = bstab(
        "train", "--model", "forecaster", "--dataset", "co2", "--epochs", "3", "--delay", "1",
        "--interval", "1", "--beta", "0.5", "--batch-size", "128", "--no-progress", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("val_"))
    match = re.match(
        r"val_mse (?P<mse>[0-9.e-]+) \(standardised; RMSE [0-9.]+ ppm\) \| trainable "
        r"(?P<share>[0-9.]+)% of the full-rank model",
        line,
    )
    assert match, result.output
    assert float(match["share"]) < 100
    with open_run(out) as run:
        names = run.metric_names
        assert "val_mse" in names and "val_acc" not in names
        assert any(n.startswith("rank/blocks.") and "self_attn" in n for n in names), names
        assert "rank/head" in names, names  # dim x horizon: within the aspect limit
        mse = run.metrics_array()[-1, names.index("val_mse")]
    assert mse == pytest.approx(float(match["mse"]), rel=1e-3)
    assert Path(tmp_path / "train-factorized.pt").exists()


@pytest.mark.parametrize(
    ("command", "model", "dataset"),
    [
        ("record", "forecaster", "digits"),
        ("record", "mlp", "co2"),
        ("train", "forecaster", "mnist1d"),
        ("train", "cnn", "co2"),
    ],
)
def test_a_mismatched_model_and_dataset_fail_cleanly(tmp_path, command, model, dataset):
    out = tmp_path / "run.h5"
    result = bstab(command, "--model", model, "--dataset", dataset, "--no-progress", "-o", out)
    line = one_error_line(result)
    assert f"--model {model}" in line and f"--dataset {dataset}" in line, line
    fix = "--model forecaster" if dataset == "co2" else "--dataset co2"
    assert_clean_failure(result, fix)
    assert not out.exists()


def test_cli_choices_and_tasks_match_the_zoo():
    assert list(MODELS) == _options._MODELS and list(DATASETS) == _options._DATASETS
    assert set(zm.TASKS) == set(MODELS) and set(zd.TASKS) == set(DATASETS)
    assert load_dataset("digits").task == zd.TASKS["digits"] == "classification"
    help_text = " ".join(bstab("record", "--help").output.split())
    assert "forecaster" in help_text and "co2" in help_text and "MSE" in help_text
