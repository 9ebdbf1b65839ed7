"""Built-in models sized for 2 CPU cores: ``mlp``, ``cnn``, ``vit-tiny`` and ``forecaster``.

The classifiers adapt to 1-D ``(C, L)`` or 2-D ``(C, H, W)`` inputs, so the same names work on
digits (8x8 images) and MNIST-1D (length-40 signals). ``forecaster`` is a regression model for
``(1, L)`` series windows (the co2 dataset). :data:`TASKS` gives each model's task, and
:func:`check_pair` refuses a model on a dataset of another task.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, expected
from .datasets import CLASSIFICATION, REGRESSION
from .datasets import TASKS as DATASET_TASKS


def _named(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    """A Sequential whose children have names, so recorded layers read ``fc1``, not ``1``."""
    return nn.Sequential(OrderedDict(layers))


def mlp(input_shape: Sequence[int], num_classes: int, width: int = 256) -> nn.Module:
    """Three Linear layers with ReLU: ``fc1``, ``fc2`` and ``head``."""
    d = math.prod(input_shape)
    return _named(
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(d, width)),
        ("act1", nn.ReLU()),
        ("fc2", nn.Linear(width, width)),
        ("act2", nn.ReLU()),
        ("head", nn.Linear(width, num_classes)),
    )


def cnn(input_shape: Sequence[int], num_classes: int, width: int = 32) -> nn.Module:
    """Three convolutions ``conv1``-``conv3`` (``conv2`` strided), global average pooling, and
    two Linear layers ``fc1`` and ``head``."""
    conv = {2: nn.Conv1d, 3: nn.Conv2d}[len(input_shape)]
    pool = {2: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool2d}[len(input_shape)]
    c = input_shape[0]
    return _named(
        ("conv1", conv(c, width, 3, padding=1)),
        ("act1", nn.ReLU()),
        ("conv2", conv(width, 2 * width, 3, padding=1, stride=2)),
        ("act2", nn.ReLU()),
        ("conv3", conv(2 * width, 2 * width, 3, padding=1)),
        ("act3", nn.ReLU()),
        ("pool", pool(1)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(2 * width, 128)),
        ("act4", nn.ReLU()),
        ("head", nn.Linear(128, num_classes)),
    )


def _blocks(dim: int, heads: int, depth: int) -> nn.ModuleList:
    """``depth`` pre-norm encoder blocks named ``blocks.0``, ``blocks.1``, ...

    Like ``nn.TransformerEncoder`` (whose ``blocks.layers.0`` names they shorten) the blocks
    are copies of one block, so they start from the same weights as before.
    """
    block = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.ModuleList(copy.deepcopy(block) for _ in range(depth))


def _encode(blocks: nn.ModuleList, tokens: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        tokens = block(tokens)
    return tokens


class ViTTiny(nn.Module):
    """A small vision transformer: patch embedding, a class token, ``depth`` encoder blocks.

    The blocks are ``nn.TransformerEncoderLayer`` so attention is ``nn.MultiheadAttention``;
    the recorded layers are ``patch_embed``, ``blocks.0.self_attn.in_proj``,
    ``blocks.0.self_attn.out_proj``, ``blocks.0.linear1``, ``blocks.0.linear2``, ... and ``head``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch: int | None = None,
    ) -> None:
        super().__init__()
        c, *spatial = input_shape
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(spatial)]
        patch = patch or (2 if len(spatial) == 2 else 4)
        if any(s % patch for s in spatial):
            raise ConfigError(
                expected(
                    "patch",
                    f"a divisor of the input size {spatial}",
                    patch,
                    "Pick a patch size that tiles the input.",
                )
            )
        n_tokens = math.prod(s // patch for s in spatial)
        self.patch_embed = conv(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = _blocks(dim, heads, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, dim)
        cls = self.cls_token.expand(len(x), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(_encode(self.blocks, tokens))[:, 0])


class Forecaster(nn.Module):
    """A small transformer forecaster: ``(B, 1, L)`` past values -> ``(B, horizon)`` future.

    Each time step is embedded by a Linear layer and given a learned position; ``depth``
    pre-norm ``nn.TransformerEncoderLayer`` blocks (so attention is ``nn.MultiheadAttention``)
    mix the steps; a Linear head maps the last step's token (the forecast origin) to the
    ``horizon`` outputs. The head is ``dim`` x ``horizon``, so OIALR may factorise it too (a
    head on all flattened tokens would be ``L * dim`` wide, beyond the aspect limit). The
    window's last value is subtracted from the inputs and added back to the outputs: the model
    learns the change from the last observation, so a trend beyond the training range is no
    extrapolation for it (a simplified instance normalisation; Autoformer handles trend with
    its series decomposition instead). The head starts small, so the first forecasts are close
    to repeating the last value. About 19k parameters at the defaults.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        horizon: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2 or input_shape[0] != 1:
            raise ConfigError(
                expected(
                    "input_shape",
                    "(1, L): one series of L steps",
                    tuple(input_shape),
                    'The forecaster takes windows of one series, e.g. `dataset="co2"`.',
                ),
                argument="dataset",
            )
        length = input_shape[1]
        self.embed = nn.Linear(1, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = _blocks(dim, heads, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, horizon)
        with torch.no_grad():  # starts close to the repeat-the-last-value forecast (not at it:
            self.head.weight.mul_(0.01)  # a zero matrix would have no singular bases)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, 0, -1:]  # (B, 1)
        steps = (x[:, 0] - last).unsqueeze(-1)  # (B, L, 1)
        tokens = _encode(self.blocks, self.embed(steps) + self.pos_embed)
        return self.head(self.norm(tokens)[:, -1]) + last


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "vit-tiny": ViTTiny,
    "forecaster": Forecaster,
}
TASKS: dict[str, str] = {
    "mlp": CLASSIFICATION,
    "cnn": CLASSIFICATION,
    "vit-tiny": CLASSIFICATION,
    "forecaster": REGRESSION,
}


def _either(names: list[str]) -> str:
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def check_pair(model: str, dataset: str) -> None:
    """Refuse a built-in model on a built-in dataset of another task (before loading either).

    Unknown names pass: :func:`build_model` and :func:`load_dataset` name the valid ones.
    """
    model_task, data_task = TASKS.get(model), DATASET_TASKS.get(dataset)
    if model_task is None or data_task is None or model_task == data_task:
        return
    models = _either([f'`model="{m}"`' for m, t in TASKS.items() if t == data_task])
    datasets = _either([f'`dataset="{d}"`' for d, t in DATASET_TASKS.items() if t == model_task])
    raise ConfigError(
        f'Expected a {data_task} model for `dataset="{dataset}"` but got `model="{model}"`, a '
        f'{model_task} model. Use {models} with `dataset="{dataset}"`, or {datasets} with '
        f'`model="{model}"`.',
        argument=("model", "dataset"),
    )


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build a built-in model with weights drawn from ``seed``.

    ``num_classes`` is the number of outputs: classes, or the horizon of the forecaster.
    """
    if name not in MODELS:
        raise ConfigError(
            expected("model", f"one of {', '.join(MODELS)}", name, "cnn is the default.")
        )
    if len(input_shape) not in (2, 3):  # the forecaster checks its own (1, L)
        raise ConfigError(
            expected(
                "input_shape",
                "(C, L) or (C, H, W)",
                tuple(input_shape),
                "Built-in models take 1-D signals or 2-D images.",
            )
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MODELS[name](input_shape, num_classes)
