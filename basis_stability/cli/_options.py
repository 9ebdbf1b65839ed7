"""Option decorators shared by several ``bstab`` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

_MODELS = ["mlp", "cnn", "vit-tiny"]


def _training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by `record` and `train`: model, data and the optimizer recipe."""
    for option in reversed(_TRAINING_OPTIONS):
        fn = option(fn)
    return fn


_TRAINING_OPTIONS = [
    click.option(
        "--model",
        type=click.Choice(_MODELS),
        default="cnn",
        show_default=True,
        help="Built-in model to train.",
    ),
    click.option(
        "--dataset",
        type=click.Choice(["digits", "mnist1d"]),
        default="digits",
        show_default=True,
        help="Offline dataset (digits ships with scikit-learn).",
    ),
    click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option(
        "--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True
    ),
    click.option(
        "--optimizer",
        type=click.Choice(["adamw", "adam", "sgd"]),
        default="adamw",
        show_default=True,
    ),
]
