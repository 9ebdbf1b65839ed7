"""Offline datasets: scikit-learn's digits (default), MNIST-1D generated locally, and co2.

All are made on the machine, never downloaded: ``load_digits`` ships with scikit-learn,
``mnist1d`` generates its data from a seed (its download path is never used) and ``co2`` is the
Mauna Loa weekly CO2 series bundled with statsmodels. digits and mnist1d are classification
tasks; co2 is a regression (forecasting) task. The task is the dataset's ``task``
(:data:`TASKS` gives it by name without loading anything).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, expected

CLASSIFICATION, REGRESSION = "classification", "regression"


@dataclass
class Dataset:
    """Tensors of a task. ``x`` is ``(N, C, *spatial)``.

    Classification (``task="classification"``): ``y`` is ``(N,)`` class indices and
    ``num_classes`` the number of classes. Regression (``task="regression"``): ``y`` is
    ``(N, num_classes)`` float targets, ``num_classes`` being the number of outputs (the horizon
    of a forecasting task); ``scale`` is the standard deviation the targets were divided by
    (1 for unscaled targets) and ``unit`` the targets' unit before scaling, so an MSE times
    ``scale**2`` is in ``unit**2``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    task: str = CLASSIFICATION
    scale: float = 1.0
    unit: str = ""

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
            '`pip install mnist1d` (or the [data] extra), or use `dataset="digits"`.',
            argument="dataset",
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


# ------------------------------------------------------------------------------ co2 (regression)
CO2_INPUT = 52  # weeks of history the forecaster sees (one year: a full seasonal cycle)
CO2_HORIZON = 8  # weeks forecast (about two months)
CO2_VAL_SHARE = 0.2  # the last 20 % of the weeks are the validation part


@dataclass
class Windows:
    """Sliding windows of a chronologically split series (see :func:`make_windows`)."""

    x_train: np.ndarray  # (N_train, L)
    y_train: np.ndarray  # (N_train, H)
    x_val: np.ndarray  # (N_val, L)
    y_val: np.ndarray  # (N_val, H)
    cut: int  # first index of the validation part
    mean: float  # of the training part, after filling its gaps
    std: float
    starts_train: np.ndarray  # index of each window's first target (the forecast origin)
    starts_val: np.ndarray


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """NaNs replaced by linear interpolation between the nearest measured neighbours.

    Leading (trailing) gaps take the first (last) measured value. Only the given values are
    used, so filling a prefix never looks at what follows it.
    """
    values = np.asarray(values, dtype=np.float64)
    known = np.flatnonzero(~np.isnan(values))
    if len(known) == 0:
        raise ConfigError("Expected a series with at least one measured value but got only NaNs.")
    return np.interp(np.arange(len(values)), known, values[known])


def make_windows(
    series: np.ndarray,
    input_len: int = CO2_INPUT,
    horizon: int = CO2_HORIZON,
    val_share: float = CO2_VAL_SHARE,
) -> Windows:
    """Split ``series`` chronologically, standardise it with training statistics, window it.

    The first ``cut = round(n * (1 - val_share))`` points are the training part, the rest the
    validation part. The training part's gaps are filled from the training part alone; the
    validation part's from the whole series (its past is known when forecasting it). The mean
    and standard deviation of the filled training part standardise everything. A window with
    forecast origin ``t`` has inputs ``z[t - L : t]`` and targets ``z[t : t + H]``; training
    windows lie wholly in the training part (``t + H <= cut``), validation windows have all
    their targets in the validation part (``t >= cut``), their inputs reaching back at most
    ``L`` points into the training part. So no validation target is ever a training input or
    target; validation inputs may be training points (the known past). Origins step by one.
    """
    series = np.asarray(series, dtype=np.float64)
    n = len(series)
    cut = int(round(n * (1 - val_share)))
    if not (input_len >= 1 and horizon >= 1 and input_len + horizon <= cut and cut + horizon <= n):
        raise ConfigError(
            expected(
                "series",
                f"room for windows of {input_len} inputs + {horizon} targets in both parts",
                f"{n} points split at {cut}",
                "Use a longer series or shorter windows.",
            )
        )
    train = fill_gaps(series[:cut])
    filled = np.concatenate([train, fill_gaps(series)[cut:]])
    mean, std = float(train.mean()), float(train.std())
    z = (filled - mean) / std

    def windows(origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([z[t - input_len : t] for t in origins]).astype(np.float32)
        y = np.stack([z[t : t + horizon] for t in origins]).astype(np.float32)
        return x, y

    starts_train = np.arange(input_len, cut - horizon + 1)
    starts_val = np.arange(cut, n - horizon + 1)
    return Windows(
        *windows(starts_train), *windows(starts_val), cut, mean, std, starts_train, starts_val
    )


def co2_series() -> np.ndarray:
    """statsmodels' bundled Mauna Loa weekly CO2 (ppm), 1958-03-29 to 2001-12-29, with NaNs."""
    try:
        from statsmodels.datasets import co2 as co2_data
    except ImportError:
        raise ConfigError(
            "The co2 dataset needs the `statsmodels` package (it ships the series). Install it "
            'with `pip install statsmodels` (or the [data] extra), or use `dataset="digits"`.',
            argument="dataset",
        ) from None
    frame = co2_data.load_pandas().data  # read from the package's own csv: no download
    weekly = frame["co2"].asfreq("W-SAT")  # already weekly on Saturdays; asfreq keeps it regular
    return weekly.to_numpy(dtype=np.float64)


def co2(seed: int = 0) -> Dataset:
    """Mauna Loa weekly CO2 as a forecasting task: 52 weeks in, the next 8 weeks out.

    2284 weeks; the first 1827 train (1768 windows), the last 457 validate (450 windows whose
    targets all lie there). Gaps (59 weeks) are filled by linear interpolation; values are
    standardised with the training part's mean and standard deviation, so the MSE is in
    standardised units (``scale`` converts it to ppm^2). ``x`` is ``(N, 1, 52)``, ``y``
    ``(N, 8)``. ``seed`` is unused: the split is chronological, not random.
    """
    del seed  # chronological split: nothing is random
    w = make_windows(co2_series())
    return Dataset(
        "co2",
        torch.from_numpy(w.x_train[:, None]),
        torch.from_numpy(w.y_train),
        torch.from_numpy(w.x_val[:, None]),
        torch.from_numpy(w.y_val),
        CO2_HORIZON,
        task=REGRESSION,
        scale=w.std,
        unit="ppm",
    )


DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "co2": co2,
}
TASKS: dict[str, str] = {"digits": CLASSIFICATION, "mnist1d": CLASSIFICATION, "co2": REGRESSION}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a built-in dataset by name (``digits``, ``mnist1d`` or ``co2``)."""
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
