"""Learning-rate warm-up and cosine decay (`--warmup EPOCHS`, `--lr-schedule cosine`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.cli import bstab, one_error_line
from torch import nn

from basis_stability import open_run
from basis_stability.errors import ConfigError
from basis_stability.training import TrainConfig, fit
from basis_stability.training.loop import lr_factor
from basis_stability.training.oialr import OIALR, OIALRConfig


def _expected(step: int, total: int, warmup: int, schedule: str) -> float:
    """The recipe written out: linear ramp to 1 over `warmup` steps, then 1 or a half cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / (total - warmup)
    return (1 + np.cos(np.pi * t)) / 2


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_lr_factor_is_the_recipe(schedule, warmup):
    total = 50
    got = [lr_factor(s, total, warmup, schedule) for s in range(total)]
    want = [_expected(s, total, warmup, schedule) for s in range(total)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if warmup:
        assert got[warmup - 1] == 1.0 and got[0] == pytest.approx(1 / warmup)
    if schedule == "cosine":
        assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1 :]))  # decays
        assert 0 < got[-1] < 0.01


def test_fit_sets_every_step_and_reports_the_epochs_last_rate(tiny_digits):
    data = tiny_digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.01, warmup=1.5, lr_schedule="cosine")
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    history = fit(model, data, cfg, optimizer=optimizer, progress=False)
    per_epoch = 3  # 96 samples / 32
    total, warmup = 5 * per_epoch, round(1.5 * per_epoch)  # 15 steps, 4 (5 rounds to 4) warm
    want = [0.01 * _expected(s, total, warmup, "cosine") for s in range(total)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    np.testing.assert_allclose([h["lr"] for h in history], want[per_epoch - 1 :: per_epoch])


def test_the_schedule_follows_the_parameters_oialr_swaps_in(tiny_digits):
    data = tiny_digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.01, lr_schedule="cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    oialr = OIALR(model, optimizer, OIALRConfig(delay=2, interval=2, beta=0.5)).attach()
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    fit(model, data, cfg, optimizer=optimizer, progress=False)
    assert oialr.converted_at is not None
    want = [0.01 * _expected(s, 12, 0, "cosine") for s in range(12)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)
    factor_s = [p for g in optimizer.param_groups for p in g["params"] if p.dim() == 2]
    assert factor_s and all(g["lr"] == pytest.approx(want[-1]) for g in optimizer.param_groups)


@pytest.mark.parametrize(
    ("fields", "name"),
    [({"warmup": 5}, "warmup"), ({"warmup": -1}, "warmup"), ({"lr_schedule": "step"}, "lr_sch")],
)
def test_bad_schedules_are_clear_errors(fields, name):
    with pytest.raises(ConfigError, match=name):
        TrainConfig(epochs=5, **fields)


def test_cli_record_with_warmup_and_cosine_stores_the_rate(tmp_path):
    out = tmp_path / "r.h5"
    args = ("--model", "mlp", "--epochs", "4", "--batch-size", "256", "--no-progress")
    result = bstab("record", *args, "--warmup", "1", "--lr-schedule", "cosine", "-o", out)
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        names = run.metric_names
        lr = run.metrics_array()[:, names.index("lr")]
    assert lr[-1] < lr[1] and lr[1] == pytest.approx(1e-3)  # warm at the end of epoch 1


def test_cli_warmup_longer_than_training_is_one_clear_line(tmp_path):
    result = bstab(
        "train", "--model", "mlp", "--epochs", "3", "--warmup", "3", "--no-progress",
        "-o", tmp_path / "x.h5",
    )  # fmt: skip
    line = one_error_line(result)
    assert "warmup" in line and "3" in line and "shorter than training" in line
