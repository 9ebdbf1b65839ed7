"""Offline datasets: scikit-learn's digits (default) and MNIST-1D generated locally.

Both are made on the machine, never downloaded: ``load_digits`` ships with scikit-learn and
``mnist1d`` generates its data from a seed (its download path is never used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, expected


@dataclass
class Dataset:
    """Tensors of a classification task. ``x`` is ``(N, C, *spatial)``; ``y`` is ``(N,)``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_share: float = 0.2):
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - test_share)))
    tr, te = order[:cut], order[cut:]
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).astype(np.float32)
    return (
        torch.from_numpy(x[tr]),
        torch.from_numpy(y[tr]).long(),
        torch.from_numpy(x[te]),
        torch.from_numpy(y[te]).long(),
    )


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits as ``(N, 1, 8, 8)``; 80/20 split by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return Dataset("digits", *_split(x, data.target, seed), num_classes=10)


def mnist1d(seed: int = 0) -> Dataset:
    """MNIST-1D (4000 train / 1000 test signals of length 40) generated locally, ``(N, 1, 40)``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ConfigError(
            "The mnist1d dataset needs the `mnist1d` package. Install it with "
            "`pip install mnist1d` (or the [data] extra), or use --dataset digits."
        ) from None
    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)  # generated in memory: no download
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None]
    y = np.concatenate([data["y"], data["y_test"]])
    n_train = len(data["x"])
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return Dataset(
        "mnist1d",
        torch.from_numpy(x[:n_train]),
        torch.from_numpy(y[:n_train]).long(),
        torch.from_numpy(x[n_train:]),
        torch.from_numpy(y[n_train:]).long(),
        10,
    )


DATASETS: dict[str, Callable[[int], Dataset]] = {"digits": digits, "mnist1d": mnist1d}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name (``digits`` or ``mnist1d``)."""
    if name not in DATASETS:
        raise ConfigError(
            expected(
                "dataset",
                f"one of {', '.join(DATASETS)}",
                name,
                "digits ships with scikit-learn and needs nothing else.",
            )
        )
    return DATASETS[name](seed)
