"""A small, deterministic training loop on in-memory tensors: classification or regression.

The task is the dataset's ``task``. Classification: cross-entropy loss, accuracy reported
(``acc``, ``val_acc``). Regression: MSE loss, MSE reported (``mse``, ``val_mse``) in the units
of the dataset's targets (standardised for co2), plus ``val_rmse_orig``, the validation RMSE
in the targets' original units (``sqrt(val_mse) * data.scale``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from ..errors import ConfigError, expected, positive_int
from ..zoo.datasets import CLASSIFICATION, REGRESSION, Dataset

_OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")

SEED_LIMIT = 2**32  # numpy's seeding and torch.manual_seed both take 0 <= seed < 2**32


def check_seed(seed: object) -> int:
    """The seed as an ``int``, if numpy and torch accept it: an integer (Python or numpy, not a
    bool) with ``0 <= seed < 2**32``.

    Raises:
        ConfigError: naming ``seed``, the value and the range.

    Example:
        >>> check_seed(7)
        7
    """
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not (0 <= seed < SEED_LIMIT)
    ):
        raise ConfigError(
            expected(
                "seed",
                f"an integer from 0 to {SEED_LIMIT - 1}",
                seed,
                "numpy and torch take seeds in [0, 2**32); use e.g. 0.",
            )
        )
    return int(seed)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fit`.

    ``warmup`` (epochs, may be fractional) ramps the learning rate linearly from ``lr / w`` to
    ``lr`` over its first w steps; ``lr_schedule="cosine"`` then decays it to 0 along a half
    cosine by the last step (the paper's recipe); see :func:`lr_factor`.
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    warmup: float = 0.0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):  # epochs first: the warm-up is checked against it
            object.__setattr__(self, name, positive_int(name, getattr(self, name), "Use e.g. 30."))
        object.__setattr__(self, "seed", check_seed(self.seed))
        if (
            isinstance(self.warmup, bool)
            or not isinstance(self.warmup, (int, float))
            or not 0 <= self.warmup < self.epochs
        ):
            raise ConfigError(
                expected(
                    "warmup",
                    f"epochs in [0, {self.epochs}) (shorter than training)",
                    self.warmup,
                    f"Use e.g. `warmup={self.epochs / 10:g}` (epochs of linear warm-up), or 0 "
                    "for none.",
                )
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                expected(
                    "lr_schedule",
                    " or ".join(LR_SCHEDULES),
                    self.lr_schedule,
                    "cosine decays the learning rate to 0 by the last step.",
                )
            )
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


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str = "constant") -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. After it,
    ``constant`` is 1 and ``cosine`` is ``(1 + cos(pi * t)) / 2`` with ``t`` running from 0 at
    the first step after warm-up to 1 at step ``total`` (so the last step's factor is just
    above 0).

    Example:
        >>> [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.038]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


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
    docstring, and ``lr``, the learning rate of the epoch's last step. ``on_loss(batch_loss)``
    after each backward pass, just before ``optimizer.step()``. ``cfg.warmup`` and
    ``cfg.lr_schedule`` set every param group's rate before each step (:func:`lr_factor`).
    """
    from tqdm.auto import tqdm

    _check_task(data.task)
    optimizer = optimizer or make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = steps_per_epoch(len(data.x_train), cfg.batch_size)
    lr = _LRPlan(per_epoch * cfg.epochs, round(cfg.warmup * per_epoch), cfg.lr_schedule)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="training", unit="epoch", disable=not progress)
    model.train()
    for epoch in bar:
        order = torch.randperm(len(data.x_train), generator=gen)
        loss_sum, correct = _train_epoch(model, data, order, cfg, optimizer, lr, on_loss)
        metrics = _epoch_metrics(model, data, loss_sum, correct, len(order), optimizer)
        history.append(metrics)
        headline = HEADLINE[data.task]
        bar.set_postfix({"loss": f"{metrics['loss']:.3f}", headline: f"{metrics[headline]:.3f}"})
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history


@dataclass
class _LRPlan:
    """The learning-rate schedule of one training, and the optimizer steps taken so far."""

    total: int
    warmup_steps: int
    schedule: str
    step: int = 0

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Set every param group's rate for the coming step (OIALR swaps tensors, groups stay)."""
        if self.warmup_steps > 0 or self.schedule != "constant":
            factor = lr_factor(self.step, self.total, self.warmup_steps, self.schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor


def _train_epoch(
    model: nn.Module,
    data: Dataset,
    order: torch.Tensor,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    lr: _LRPlan,
    on_loss: LossHook | None,
) -> tuple[float, int]:
    """One pass over the training split in ``order``: the summed loss and the hits."""
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
        out = model(xb)
        loss = _loss(out, yb, data.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        batch_loss = loss.item()
        if on_loss is not None:
            on_loss(batch_loss)
        lr.apply(optimizer)
        optimizer.step()
        lr.step += 1
        loss_sum += batch_loss * len(idx)
        if data.task != REGRESSION:
            correct += _hits(out, yb)
    return loss_sum, correct


def _epoch_metrics(
    model: nn.Module,
    data: Dataset,
    loss_sum: float,
    correct: int,
    n: int,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    """The epoch's training means, its validation numbers and the last step's rate."""
    val_loss, val_metric = evaluate(model, data.x_test, data.y_test, task=data.task)
    loss_mean = loss_sum / n
    if data.task == REGRESSION:
        return {
            "loss": loss_mean,
            "mse": loss_mean,
            "val_loss": val_loss,
            "val_mse": val_metric,
            "val_rmse_orig": math.sqrt(val_metric) * data.scale,
            "lr": optimizer.param_groups[0]["lr"],
        }
    return {
        "loss": loss_mean,
        "acc": correct / n,
        "val_loss": val_loss,
        "val_acc": val_metric,
        "lr": optimizer.param_groups[0]["lr"],
    }
