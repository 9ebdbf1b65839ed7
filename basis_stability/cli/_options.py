"""Option decorators and option checks shared by several ``bstab`` commands."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, expected

# the zoo's names (zoo.MODELS, zoo.DATASETS), spelt out so `bstab --help` needs no torch import
_MODELS = ["mlp", "cnn", "vit-tiny", "forecaster"]
_DATASETS = ["digits", "mnist1d", "co2"]
SEED_LIMIT = 2**32  # numpy's legacy seeding and torch.manual_seed both take 0 <= seed < 2**32


class _Seed(click.ParamType):
    """An integer seed in [0, 2**32): what numpy and torch accept."""

    name = "integer"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            seed = value
        else:
            try:
                seed = int(str(value).strip(), 10)
            except ValueError:
                seed = None
        if seed is None or not 0 <= seed < SEED_LIMIT:
            self.fail(
                expected(
                    "--seed",
                    f"an integer from 0 to {SEED_LIMIT - 1}",
                    value,
                    "numpy and torch take seeds in [0, 2**32); use e.g. --seed 0.",
                ),
                param,
                ctx,
            )
        return seed


class _PositiveFloat(click.ParamType):
    """A finite number > 0 (refuses inf, nan and overflowing literals such as 1e400)."""

    name = "float"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            name = f"--{param.name.replace('_', '-')}" if param is not None else "value"
            self.fail(expected(name, "a finite number > 0", value, "Use e.g. 1e-3."), param, ctx)
        return number


def parse_lag(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    """``--lag`` (a click callback) as a :class:`~basis_stability.analysis.lag.Lag`; a bad one
    is a usage error spelt in the running command's flags."""
    from ..analysis.lag import Lag
    from ._errors import render

    try:
        return Lag.parse(value)
    except ConfigError as exc:
        text = render(str(exc), ctx.command.name, exc.arguments)
        raise click.BadParameter(text, ctx, param) from None


def show_progress(no_progress: bool) -> bool:
    """Progress bars unless ``--no-progress``, and only on a terminal: redirected to a log, a
    bar's every redraw would be a line of it."""
    return not no_progress and sys.stderr.isatty()


def check_output(path: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output path that cannot be created.

    Checks that no existing ancestor of ``path`` is a file and that the nearest existing one
    (the folder the file, or its missing parent folders, would be created in) is writable.

    Raises:
        ConfigError: naming ``option``, the path and the fix.
    """
    if path.is_dir():
        raise ConfigError(
            expected(
                option,
                "a file path",
                str(path),
                f"It is a directory; name a file in it, e.g. {path / 'run.h5'}.",
            )
        )
    for folder in path.parents:  # nearest first; pathlib reports 'FILE/x' as missing
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise ConfigError(
                expected(
                    option,
                    "a path inside a folder",
                    str(path),
                    f"Its parent {folder} is a file, not a folder; choose another {option}.",
                )
            )
        if not os.access(folder, os.W_OK | os.X_OK):  # also False on a read-only mount for root
            raise ConfigError(
                expected(
                    option,
                    "a path in a writable folder",
                    str(path),
                    f"{folder.resolve()} is read-only here; choose a writable {option}.",
                )
            )
        return


def training_config(
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    seed: int,
    warmup: float,
    lr_schedule: str,
):
    """The :class:`~basis_stability.training.TrainConfig` of the shared training options."""
    from ..training import TrainConfig

    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        warmup=warmup,
        lr_schedule=lr_schedule,
    )


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
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
        help="Built-in model to train: classifiers mlp, cnn, vit-tiny (digits, mnist1d); "
        "forecaster, a small transformer forecaster (co2).",
    ),
    click.option(
        "--dataset",
        type=click.Choice(_DATASETS),
        default="digits",
        show_default=True,
        help="Offline dataset: digits (ships with scikit-learn) and mnist1d are classification, "
        "reported by accuracy; co2 (Mauna Loa weekly CO2, ships with statsmodels; 52 weeks in, "
        "8 out) is forecasting, reported by MSE. Use --model forecaster with co2.",
    ),
    click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True),
    click.option("--seed", type=_Seed(), default=0, show_default=True, help="0 <= seed < 2**32."),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--lr", type=_PositiveFloat(), default=1e-3, show_default=True),
    click.option(
        "--optimizer",
        type=click.Choice(["adamw", "adam", "sgd"]),
        default="adamw",
        show_default=True,
    ),
    click.option(
        "--warmup",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        metavar="EPOCHS",
        help="Linear learning-rate warm-up over the first EPOCHS epochs (fractions allowed).",
    ),
    click.option(
        "--lr-schedule",
        type=click.Choice(["constant", "cosine"]),
        default="constant",
        show_default=True,
        help="After warm-up: constant, or cosine decay to 0 by the last step (the paper's "
        "recipe, with --warmup).",
    ),
]


def analysis_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by `analyze`, `report` and `compare`: the measurement, the plan's
    rules, the decompositions and their cache; :func:`analysis_configs` turns them into
    configs."""
    for option in reversed(_ANALYSIS_OPTIONS):
        fn = option(fn)
    return fn


def analysis_configs(opts: dict[str, Any]):
    """The analysis, engine and plan configs that :func:`analysis_options` describe."""
    from ..analysis import AnalysisConfig, EngineConfig
    from ..recommend import PlanConfig

    engine = ("svd", "method", "svd_dtype", "chunk_mb", "device", "jobs")
    plan = ("tau", "share", "beta_rule", "min_energy", "target_share")
    return (
        AnalysisConfig(lag=opts["lag"], k=opts["k"]),
        EngineConfig(**{n: opts[n] for n in engine}, cache=not opts["no_cache"]),
        PlanConfig(**{n: opts[n] for n in plan}),
    )


_ANALYSIS_OPTIONS = [
    click.option(
        "--lag",
        metavar="LAG",
        default="5",
        callback=parse_lag,
        show_default=True,
        help="How far apart the lag pairs of the delay rule are: N snapshots, or a time, 5ep "
        "(epochs) or 200steps, pairing each snapshot with the one nearest that long before it.",
    ),
    click.option(
        "--k",
        "k",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Top-k of the singular-subspace overlap O_k.",
    ),
    click.option(
        "--tau",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.99,
        show_default=True,
        help="A layer is stable when S >= tau.",
    ),
    click.option(
        "--share",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.9,
        show_default=True,
        help="Parameter share of stable layers the delay needs.",
    ),
    click.option(
        "--beta-rule",
        type=click.Choice(["energy", "share"]),
        default="energy",
        show_default=True,
        help="Pick beta by kept energy or by a trainable-share target.",
    ),
    click.option(
        "--min-energy",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.9,
        show_default=True,
        help="energy rule: spectral energy every layer must keep.",
    ),
    click.option(
        "--target-share",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.25,
        show_default=True,
        help="share rule: trainable share of the recorded layers.",
    ),
    click.option(
        "--svd",
        type=click.Choice(["exact", "approx"]),
        default="exact",
        show_default=True,
        help="approx: randomised top-k (no S, fast on big layers).",
    ),
    click.option(
        "--method",
        type=click.Choice(["gram", "svd"]),
        default="gram",
        show_default=True,
        help="exact mode: float64 Gram eigendecomposition (SVD above cond 1e4), or an SVD each.",
    ),
    click.option(
        "--svd-dtype",
        type=click.Choice(["float32", "float64"]),
        default="float32",
        show_default=True,
        help="precision of the cached vectors (and of --method svd).",
    ),
    click.option(
        "--chunk-mb",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="memory one batched decomposition of a layer's snapshots may take.",
    ),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
    click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Worker processes over layers.",
    ),
    click.option(
        "--no-cache", is_flag=True, help="Do not read or write the SVD sidecar cache of a run."
    ),
]
