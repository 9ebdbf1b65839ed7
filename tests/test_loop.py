"""The plain training loop (training/loop.py): its updates are hand-computed numpy updates, its
metrics are numpy's, it is deterministic by seed, and its config refuses what it cannot run.
(The learning-rate recipe step by step is in test_lr_schedule.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError
from basis_stability.training.loop import (
    TrainConfig,
    evaluate,
    fit,
    lr_factor,
    make_optimizer,
    steps_per_epoch,
)
from basis_stability.zoo.datasets import Dataset

N, D, C = 12, 5, 3  # samples, features, classes (or regression outputs)


def _data(task: str = "classification", seed: int = 0, scale: float = 1.0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, D, generator=g)  # (N, C=1, L=D)
    xt = torch.randn(7, 1, D, generator=g)
    if task == "classification":
        y, yt = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (7,), generator=g)
    else:
        y, yt = torch.randn(N, C, generator=g), torch.randn(7, C, generator=g)
    return Dataset("toy", x, y, xt, yt, C, task=task, scale=scale)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, C))


def _wb(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    lin = model[1]
    return lin.weight.detach().double().numpy().copy(), lin.bias.detach().double().numpy().copy()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ce_grad(w, b, x, y):
    """Mean cross-entropy of logits x w^T + b, and its gradient in (w, b)."""
    p = _softmax(x @ w.T + b)  # (B, C)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return loss, p.T @ x, p.sum(0)


def _mse_grad(w, b, x, y):
    """Mean squared error over every target, and its gradient in (w, b)."""
    r = x @ w.T + b - y  # (B, H)
    g = 2.0 * r / r.size
    return (r**2).mean(), g.T @ x, g.sum(0)


def _sgd_oracle(w, b, data, cfg, grad):
    """Plain numpy SGD with momentum and (coupled) weight decay, batches in fit's order."""
    x = data.x_train.reshape(N, -1).double().numpy()
    y = data.y_train.numpy().astype(np.float64 if data.task == "regression" else np.int64)
    gen = torch.Generator().manual_seed(cfg.seed)
    vw, vb, losses = None, None, []
    for _ in range(cfg.epochs):
        order = torch.randperm(N, generator=gen).numpy()
        for i in range(0, N, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss, gw, gb = grad(w, b, x[idx], y[idx])
            losses.append(loss)
            gw, gb = gw + cfg.weight_decay * w, gb + cfg.weight_decay * b
            vw = gw if vw is None else cfg.momentum * vw + gw
            vb = gb if vb is None else cfg.momentum * vb + gb
            w, b = w - cfg.lr * vw, b - cfg.lr * vb
    return w, b, losses


# ---------------------------------------------------------------------- updates
def test_one_full_batch_sgd_step_is_the_hand_computed_update():
    data, model = _data(), _linear()
    w0, b0 = _wb(model)
    cfg = TrainConfig(
        epochs=1, batch_size=N, lr=0.5, optimizer="sgd", momentum=0.0, weight_decay=0.01
    )
    history = fit(model, data, cfg, progress=False)
    x = data.x_train.reshape(N, -1).double().numpy()
    loss, gw, gb = _ce_grad(w0, b0, x, data.y_train.numpy())
    w1, b1 = w0 - 0.5 * (gw + 0.01 * w0), b0 - 0.5 * (gb + 0.01 * b0)
    w, b = _wb(model)
    np.testing.assert_allclose(w, w1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, b1, rtol=0, atol=1e-6)
    assert history[0]["loss"] == pytest.approx(loss, abs=1e-6)  # the loss before the step


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_minibatch_sgd_with_momentum_over_epochs_follows_the_numpy_oracle(task: str):
    data, model = _data(task), _linear()
    w0, b0 = _wb(model)
    cfg = TrainConfig(
        epochs=3, batch_size=5, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-3, seed=7
    )
    seen: list[float] = []
    fit(model, data, cfg, on_loss=seen.append, progress=False)
    grad = _ce_grad if task == "classification" else _mse_grad
    w, b, losses = _sgd_oracle(w0, b0, data, cfg, grad)
    got_w, got_b = _wb(model)
    np.testing.assert_allclose(got_w, w, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_b, b, rtol=0, atol=1e-5)
    assert len(seen) == 3 * steps_per_epoch(N, 5) == 9  # 5 + 5 + 2 per epoch
    np.testing.assert_allclose(seen, losses, rtol=1e-5)


def test_same_seed_same_weights_other_seed_other_order():
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, optimizer="adamw")
    runs = []
    for seed in (0, 0, 1):
        model = _linear()
        fit(model, _data(), TrainConfig(**{**cfg.__dict__, "seed": seed}), progress=False)
        runs.append(_wb(model))
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not np.array_equal(runs[0][0], runs[2][0])


# ---------------------------------------------------------------------- metrics
def test_history_and_hooks_report_numpy_metrics_of_the_model_after_each_epoch(tiny_digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01)
    epochs: list[tuple[int, dict]] = []
    history = fit(
        model, tiny_digits, cfg, on_epoch_end=lambda e, m: epochs.append((e, m)), progress=False
    )
    assert [e for e, _ in epochs] == [1, 2] and [m for _, m in epochs] == history
    assert set(history[-1]) == {"loss", "acc", "val_loss", "val_acc", "lr"}
    w, b = _wb(model)
    x = tiny_digits.x_test.reshape(len(tiny_digits.x_test), -1).double().numpy()
    y = tiny_digits.y_test.numpy()
    logits = x @ w.T + b
    p = _softmax(logits)
    assert history[-1]["val_acc"] == pytest.approx((logits.argmax(1) == y).mean(), abs=1e-12)
    assert history[-1]["val_loss"] == pytest.approx(
        -np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5
    )
    assert history[-1]["lr"] == 0.01
    assert model.training  # fit leaves the model in training mode


def test_regression_history_has_the_mse_and_rmse_in_original_units():
    data, model = _data("regression", scale=2.5), _linear()
    history = fit(model, data, TrainConfig(epochs=1, batch_size=N), progress=False)
    last = history[-1]
    assert set(last) == {"loss", "mse", "val_loss", "val_mse", "val_rmse_orig", "lr"}
    w, b = _wb(model)
    xt = data.x_test.reshape(7, -1).double().numpy()
    mse = ((xt @ w.T + b - data.y_test.double().numpy()) ** 2).mean()
    assert last["val_mse"] == last["val_loss"] == pytest.approx(mse, rel=1e-5)
    assert last["val_rmse_orig"] == pytest.approx(np.sqrt(mse) * 2.5, rel=1e-5)
    assert last["mse"] == last["loss"]


def test_evaluate_in_batches_equals_numpy_and_restores_the_mode():
    data, model = _data(), _linear()
    model.eval()
    loss, acc = evaluate(model, data.x_train, data.y_train, batch_size=5)  # 5 + 5 + 2
    w, b = _wb(model)
    x, y = data.x_train.reshape(N, -1).double().numpy(), data.y_train.numpy()
    want_loss, _, _ = _ce_grad(w, b, x, y)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert acc == pytest.approx(((x @ w.T + b).argmax(1) == y).mean(), abs=1e-12)
    assert not model.training
    model.train()
    evaluate(model, data.x_train, data.y_train)
    assert model.training


def test_a_dataset_of_an_unknown_task_is_refused():
    data = _data()
    data.task = "ranking"
    with pytest.raises(ConfigError, match="task.*classification or regression"):
        fit(_linear(), data, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="task"):
        evaluate(_linear(), data.x_test, data.y_test, task="ranking")


# ---------------------------------------------------------------------- config and optimizers
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"warmup": -1}, "warmup"),
        ({"warmup": 40}, "warmup"),  # not shorter than the 40 epochs
        ({"lr_schedule": "linear"}, "lr_schedule"),
    ],
)
def test_train_config_refuses_bad_values_naming_the_field(kwargs: dict, name: str):
    with pytest.raises(ConfigError, match=f"Expected `{name}`"):
        TrainConfig(**kwargs)


def test_make_optimizer_takes_the_configs_settings_and_only_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    sgd = make_optimizer(
        model, TrainConfig(optimizer="sgd", lr=0.3, momentum=0.5, weight_decay=0.2)
    )
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.5, 0.2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(group["params"]) == 3 and all(
        any(p is q for q in trainable) for p in group["params"]
    )
    assert type(make_optimizer(model, TrainConfig(optimizer="adam"))) is torch.optim.Adam
    assert type(make_optimizer(model, TrainConfig())) is torch.optim.AdamW


def test_lr_factor_and_steps_per_epoch_known_answers():
    got = [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 9)]
    assert got == [0.5, 1.0, 1.0, 0.038]  # the docstring's example
    assert lr_factor(5, 10, 0, "constant") == 1.0
    assert steps_per_epoch(1438, 64) == 23 and steps_per_epoch(64, 64) == 1
