"""Export a trained low-rank model as plain PyTorch layers, and compare it with the dense model.

``export_factorized(model)`` returns a copy in which each low-rank Linear (and transformers
``Conv1D``) becomes two thin ``nn.Linear`` layers and each low-rank convolution a rank-k convolution
followed by a 1x1
convolution (attention stays an ``nn.MultiheadAttention`` with its dense, formed weights: its
packed projection has no two-layer equivalent in the stock module). The result uses only
``torch.nn`` modules, so it loads without this package's training machinery.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..lowrank.layers import (
    LowRankConv,
    LowRankConv1D,
    LowRankLinear,
    LowRankMultiheadAttention,
    filled,
    linear_factors,
)
from ..lowrank.surgery import low_rank_layers
from ..recommend.rules import factors_pay
from ..registry import lookup
from ..views import unwrap_model


def _thin_linear(layer: LowRankLinear | LowRankConv1D) -> nn.Sequential:
    f = layer.factor
    # a Linear's (out, in) weight is the tall matrix unless transposed; a Conv1D's is, if so
    linear_is_tall = f.transposed == isinstance(layer, LowRankConv1D)
    first, last = linear_factors(f, linear_is_tall)
    if not _pair_is_smaller(f):  # k (m + n) >= m n: one dense Linear is smaller and cheaper
        dense = nn.Linear(first.shape[1], last.shape[0], bias=layer.bias is not None)
        return filled(dense, last @ first, layer.bias)
    a = nn.Linear(first.shape[1], first.shape[0], bias=False)
    b = nn.Linear(last.shape[1], last.shape[0], bias=layer.bias is not None)
    return _pair(a, b, first, last, layer.bias)


def _pair(a: nn.Module, b: nn.Module, first, second, bias) -> nn.Sequential:
    """``a`` then ``b``, holding the thin weights ``first`` and ``second`` (and ``bias`` on
    ``b``)."""
    with torch.no_grad():
        a.weight.copy_(first)
        b.weight.copy_(second)
        if bias is not None:
            b.bias.copy_(bias)
    return nn.Sequential(a, b)


def _pair_is_smaller(factor) -> bool:
    """Whether two thin layers (k (m + n) entries) hold fewer entries than the dense m x n."""
    return factors_pay(factor.rank, *factor.tall_shape)


def _thin_conv(layer: LowRankConv) -> nn.Module:
    if layer.groups != 1 or not _pair_is_smaller(layer.factor):
        return layer.to_dense()
    klass = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer.dims]
    first, mix = layer.thin_weights()
    a = klass(
        layer.in_channels,
        layer.rank,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=False,
    )
    b = klass(layer.rank, layer.out_channels, 1, bias=layer.bias is not None)
    return _pair(a, b, first, mix, layer.bias)


# modules whose stock forward reads ``child.weight`` of their Linear children (the
# TransformerEncoderLayer / DecoderLayer inference fast path): those children stay dense
_READS_WEIGHT = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def export_factorized(model: nn.Module) -> nn.Module:
    """A plain-``torch.nn`` copy of ``model`` with thin two-layer replacements (same outputs).

    A layer whose rank is still so high that the two thin layers would hold no fewer entries
    than the dense one (``k (m + n) >= m n``) is exported as one dense layer instead.
    """
    out = copy.deepcopy(unwrap_model(model)).eval()
    layers = low_rank_layers(out)
    attention = {n for n, m in layers.items() if isinstance(m, LowRankMultiheadAttention)}
    for name in sorted(layers, key=lambda n: -n.count(".")):  # inner layers first
        if name.rpartition(".")[0] in attention:  # out_proj: the attention densifies it itself
            continue
        module = out.get_submodule(name)
        if isinstance(module, LowRankLinear) and isinstance(
            out.get_submodule(name.rpartition(".")[0]) if "." in name else out, _READS_WEIGHT
        ):  # the stock fast path reads .weight of linear1/linear2: keep one dense Linear
            new = module.to_dense()
        elif isinstance(module, (LowRankLinear, LowRankConv1D)):
            new = _thin_linear(module)
        elif isinstance(module, LowRankConv):
            new = _thin_conv(module)
        elif isinstance(module, LowRankMultiheadAttention):
            new = module.to_dense()
        else:  # pragma: no cover - low_rank_layers returns only these
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, new)
    return out


@dataclass
class ExportReport:
    params_dense: int
    params_factorized: int
    macs_dense: int
    macs_factorized: int
    ms_dense: float
    ms_factorized: float

    @property
    def speedup(self) -> float:
        return self.ms_dense / self.ms_factorized

    def __str__(self) -> str:
        return (
            f"parameters {self.params_dense:,} -> {self.params_factorized:,} "
            f"({self.params_factorized / self.params_dense:.1%}); multiply-adds "
            f"{self.macs_dense:,} -> {self.macs_factorized:,} per sample; CPU inference "
            f"{self.ms_dense:.2f} -> {self.ms_factorized:.2f} ms per batch "
            f"({self.speedup:.2f}x)"
        )


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of the layers the registry can count (Linear, convolutions, transformers'
    Conv1D) for one forward pass of ``example``, per sample."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += lookup(module).macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if (entry := lookup(m)) is not None and entry.macs is not None
    ]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    return total // len(example)


def _time_ms(model: nn.Module, example: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _refuse_low_rank(model: nn.Module, arg: str, fix: str) -> None:
    names = list(low_rank_layers(model))
    if names:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ConfigError(
            f"Expected `{arg}` to hold only torch.nn layers but got a {type(model).__name__} "
            f"that still holds {len(names)} low-rank layer(s): {shown}. {fix}"
        )


def compare_export(
    dense: nn.Module, factorized: nn.Module, example: torch.Tensor, repeats: int = 30
) -> ExportReport:
    """Parameters, multiply-adds and median CPU inference time of two models on ``example``.

    Args:
        dense: the dense baseline, e.g. ``densify_(copy.deepcopy(model))``.
        factorized: the exported model, ``export_factorized(model)``.

    Raises:
        ConfigError: either model still holds low-rank layers, whose parameters (full
            factors, possibly untruncated) and multiply-adds would be counted wrongly.
    """
    _refuse_low_rank(
        dense, "dense", "Call densify_(copy.deepcopy(model)) first or pass the dense model."
    )
    _refuse_low_rank(
        factorized, "factorized", "Pass export_factorized(model), built only from torch.nn layers."
    )
    dense, factorized = dense.eval(), factorized.eval()
    n_params = [sum(p.numel() for p in m.parameters()) for m in (dense, factorized)]
    return ExportReport(
        n_params[0],
        n_params[1],
        count_macs(dense, example),
        count_macs(factorized, example),
        _time_ms(dense, example, repeats),
        _time_ms(factorized, example, repeats),
    )


def dense_copy(model: nn.Module) -> nn.Module:
    """A dense copy of a (partly) low-rank model, in eval mode: the baseline that
    :func:`compare_export` holds the exported model to. ``model`` is not changed."""
    from ..lowrank import densify_

    dense = copy.deepcopy(model)
    densify_(dense)
    return dense.eval()
