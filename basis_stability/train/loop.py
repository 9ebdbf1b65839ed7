"""A small, deterministic classification training loop on in-memory tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from ..errors import ConfigError, expected
from ..zoo.datasets import Dataset

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


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
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
    ``loss``, ``acc`` (training, running means), ``val_loss`` and ``val_acc``;
    ``on_loss(batch_loss)`` after each backward pass, just before ``optimizer.step()``.
    """
    from tqdm.auto import tqdm

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
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            batch_loss = loss.item()
            if on_loss is not None:
                on_loss(batch_loss)
            optimizer.step()
            loss_sum += batch_loss * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
        val_loss, val_acc = evaluate(model, data.x_test, data.y_test)
        metrics = {
            "loss": loss_sum / len(order),
            "acc": correct / len(order),
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", val_acc=f"{val_acc:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history
