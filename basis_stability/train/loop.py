"""A small, deterministic training loop on in-memory tensors: classification or regression.

The task is the dataset's ``task``. Classification: cross-entropy loss, accuracy reported
(``acc``, ``val_acc``). Regression: MSE loss, MSE reported (``mse``, ``val_mse``) in the units
of the dataset's targets (standardised for co2), plus ``val_rmse_orig``, the validation RMSE
in the targets' original units (``sqrt(val_mse) * data.scale``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from ..errors import ConfigError, expected
from ..zoo.datasets import CLASSIFICATION, REGRESSION, Dataset

_OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(expected(name, "a positive integer", value, "Use e.g. 30."))
        if not self.lr > 0:
            raise ConfigError(expected("lr", "a positive number", self.lr, "Use e.g. 1e-3."))
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(
                expected(
                    "optimizer",
                    f"one of {', '.join(_OPTIMIZERS)}",
                    self.optimizer,
                    "adamw is the default.",
                )
            )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    klass = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return klass(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


#: the metric that sums up a run of each task (the last epoch's value is the headline)
HEADLINE = {CLASSIFICATION: "val_acc", REGRESSION: "val_mse"}


def _check_task(task: str) -> None:
    if task not in HEADLINE:
        raise ConfigError(
            expected("task", " or ".join(HEADLINE), task, "Datasets say which they are.")
        )


def _loss(out: torch.Tensor, y: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    if task == REGRESSION:
        # summed over every target of the batch; "mean" is per target, the MSE
        return F.mse_loss(out, y.to(out.dtype), reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def _hits(out: torch.Tensor, y: torch.Tensor) -> int:
    return int((out.argmax(1) == y).sum().item())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    task: str = CLASSIFICATION,
) -> tuple[float, float]:
    """``(loss, metric)`` of ``model`` on ``(x, y)``.

    Classification: mean cross-entropy and accuracy. Regression: the MSE (mean over samples
    and outputs) twice, since the loss is the metric.
    """
    _check_task(task)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss_sum += _loss(out, yb, task, reduction="sum").item()
        if task == CLASSIFICATION:
            correct += _hits(out, yb)
    model.train(was_training)
    if task == REGRESSION:
        mse = loss_sum / y.numel()
        return mse, mse
    return loss_sum / len(x), correct / len(x)


EpochHook = Callable[[int, dict[str, float]], None]
LossHook = Callable[[float], None]


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: EpochHook | None = None,
    on_loss: LossHook | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` on ``data`` for ``cfg.epochs`` epochs; returns one metrics dict per epoch.

    ``on_epoch_end(epoch, metrics)`` is called after each epoch (epochs count from 1) with
    ``loss``, ``acc`` (training, running means), ``val_loss`` and ``val_acc`` for a
    classification dataset; ``loss``, ``mse`` (training, running means), ``val_loss``,
    ``val_mse`` and ``val_rmse_orig`` for a regression one (``data.task``), see the module
    docstring. ``on_loss(batch_loss)`` after each backward pass, just before
    ``optimizer.step()``.
    """
    from tqdm.auto import tqdm

    task = data.task
    _check_task(task)
    regression = task == REGRESSION
    optimizer = optimizer or make_optimizer(model, cfg)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="training", unit="epoch", disable=not progress)
    model.train()
    for epoch in bar:
        order = torch.randperm(len(data.x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            out = model(xb)
            loss = _loss(out, yb, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            batch_loss = loss.item()
            if on_loss is not None:
                on_loss(batch_loss)
            optimizer.step()
            loss_sum += batch_loss * len(idx)
            if not regression:
                correct += _hits(out, yb)
        val_loss, val_metric = evaluate(model, data.x_test, data.y_test, task=task)
        loss_mean = loss_sum / len(order)
        if regression:
            metrics = {
                "loss": loss_mean,
                "mse": loss_mean,
                "val_loss": val_loss,
                "val_mse": val_metric,
                "val_rmse_orig": math.sqrt(val_metric) * data.scale,
            }
        else:
            metrics = {
                "loss": loss_mean,
                "acc": correct / len(order),
                "val_loss": val_loss,
                "val_acc": val_metric,
            }
        history.append(metrics)
        headline = HEADLINE[task]
        bar.set_postfix({"loss": f"{loss_mean:.3f}", headline: f"{metrics[headline]:.3f}"})
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history
