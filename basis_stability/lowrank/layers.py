"""Low-rank layers ``W = U S Vh`` with frozen bases U, Vh and a trainable dense k x k S (SPEC §5).

The factor lives on the layer's *tall* matrix (SPEC §1), so a Linear, a convolution and an
attention projection share one :class:`LowRankFactor`. Every low-rank layer keeps a ``weight``
property that forms the dense weight in the original shape: code that reads ``layer.weight`` (the
recorder, ``nn.MultiheadAttention.forward``, a ``TransformerEncoderLayer`` fast path) keeps
working and sees the effective W.

Example:
    >>> lin = nn.Linear(8, 6)
    >>> low = LowRankLinear.from_dense(lin)
    >>> x = torch.randn(4, 8)
    >>> bool(torch.allclose(low(x), lin(x), atol=1e-5)), low.rank
    (True, 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..registry import IN_OUT, OUT_IN, Matrix, register_layer, tall_shape, to_tall

__all__ = [
    "LowRankConv",
    "LowRankConv1D",
    "LowRankFactor",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "Rotation",
]


@dataclass(frozen=True)
class Rotation:
    """What one update did to a factor: ``S = Up diag(s) Vph``, then the top ``k_new`` kept."""

    Up: torch.Tensor  # (k_old, k_old)
    Vph: torch.Tensor  # (k_old, k_old)
    s: torch.Tensor  # (k_old,) singular values of S, descending
    k_old: int
    k_new: int


class LowRankFactor(nn.Module):
    """``W_tall = U @ S @ Vh``: U (m, k) and Vh (k, n) frozen buffers, S (k, k) trainable."""

    def __init__(
        self,
        U: torch.Tensor,  # noqa: N803 - the names of torch.linalg.svd
        S: torch.Tensor,  # noqa: N803
        Vh: torch.Tensor,  # noqa: N803
        orig_shape: tuple[int, ...],
        transposed: bool,
    ) -> None:
        super().__init__()
        self.register_buffer("U", U)
        self.register_buffer("Vh", Vh)
        self.S = nn.Parameter(S)
        self.orig_shape = tuple(int(d) for d in orig_shape)
        self.transposed = bool(transposed)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, orientation: str = OUT_IN) -> LowRankFactor:
        """Exact factorisation (float64 SVD, stored in the weight's dtype): S = diag(s), k = n.

        ``orientation`` is how ``weight`` is stored (see :func:`~basis_stability.registry.
        tall_shape`); the factor lives on the same tall matrix the recorder stores.
        """
        shape, transposed = tall_shape(weight.shape, orientation)
        w = to_tall(weight.detach(), transposed).double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        dt = weight.dtype
        return cls(
            u.to(dt).contiguous(),
            torch.diag(s).to(dt),
            vh.to(dt).contiguous(),
            tuple(weight.shape),
            transposed,
        )

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def tall_shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    def tall(self) -> torch.Tensor:
        """The effective tall matrix ``U S Vh`` (m, n)."""
        return self.U @ self.S @ self.Vh

    def dense(self) -> torch.Tensor:
        """The effective weight in the layer's own shape."""
        mat = self.tall()
        return (mat.T if self.transposed else mat).reshape(self.orig_shape)

    def trainable_params(self) -> int:
        return self.rank * self.rank

    @torch.no_grad()
    def rotate_and_truncate_(self, k_new: int, svd: tuple | None = None) -> Rotation:
        """Rotate so that S is diagonal (W unchanged), then keep the top ``k_new`` values.

        ``U <- U Up``, ``Vh <- Vph Vh``, ``S <- diag(s)`` with ``S = Up diag(s) Vph``; then U, S, Vh
        are cut to ``k_new``. The new S is a new Parameter (its shape changed): the caller
        swaps it into the optimizer (see :mod:`.optim_state`).
        """
        k_old = self.rank
        if not 1 <= k_new <= k_old:
            raise ValueError(f"Expected `k_new` in 1..{k_old} but got {k_new}.")
        if svd is None:
            svd = torch.linalg.svd(self.S.detach().double())
        up, s, vph = svd
        dt = self.S.dtype
        self.U = (self.U.double() @ up[:, :k_new]).to(dt).contiguous()
        self.Vh = (vph[:k_new] @ self.Vh.double()).to(dt).contiguous()
        self.S = nn.Parameter(torch.diag(s[:k_new]).to(dt), requires_grad=self.S.requires_grad)
        return Rotation(up.to(dt), vph.to(dt), s.to(dt), k_old, k_new)

    def extra_repr(self) -> str:
        m, n = self.tall_shape
        return f"tall={m}x{n}, rank={self.rank}, transposed={self.transposed}"


def filled(dense: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``dense`` moved to ``weight``'s device and dtype, holding ``weight`` and ``bias``."""
    dense = dense.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def _cheaper_to_form(factor: LowRankFactor, rows: int) -> bool:
    """Whether forming W then one product costs fewer multiply-adds than three thin products."""
    m, n = factor.tall_shape
    k = factor.rank
    form = m * k * k + m * k * n + rows * m * n  # (U S) Vh, then x W^T
    apply = rows * (n * k + k * k + k * m)  # x through Vh, S, U
    return form <= apply


class _Factored(nn.Module):
    """Shared by the layers holding one ``factor``: the effective dense weight and the rank."""

    factor: LowRankFactor

    @property
    def weight(self) -> torch.Tensor:
        return self.factor.dense()

    @property
    def rank(self) -> int:
        return self.factor.rank


class LowRankLinear(_Factored):
    """A Linear layer ``y = x W^T + b`` with ``W`` held as a :class:`LowRankFactor`."""

    def __init__(self, factor: LowRankFactor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.factor = factor
        self.bias = bias
        self.in_features = factor.orig_shape[1]
        self.out_features = factor.orig_shape[0]

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> LowRankLinear:
        """Exact conversion; the bias Parameter is reused (the optimizer keeps its state)."""
        return cls(LowRankFactor.from_weight(linear.weight), linear.bias)

    def to_dense(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return filled(out, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _thin_linear_forward(
            self.factor, x, self.bias, linear_is_tall=not self.factor.transposed
        )


def linear_factors(
    factor: LowRankFactor, linear_is_tall: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, last)`` with ``W_linear = last @ first``: ``first`` (k, in), ``last`` (out, k).

    ``W_linear`` is the ``(out, in)`` weight of ``F.linear``; it is the tall matrix ``U S Vh``
    itself when ``linear_is_tall``, else its transpose.
    """
    f = factor
    return (f.Vh, f.U @ f.S) if linear_is_tall else (f.U.T, (f.S @ f.Vh).T)


def _thin_linear_forward(
    factor: LowRankFactor, x: torch.Tensor, bias: torch.Tensor | None, linear_is_tall: bool
) -> torch.Tensor:
    """``x W_linear^T + b`` by the cheaper of forming W and the two thin products."""
    if _cheaper_to_form(factor, x.numel() // max(x.shape[-1], 1)):
        tall = factor.tall()
        return F.linear(x, tall if linear_is_tall else tall.T, bias)
    first, last = linear_factors(factor, linear_is_tall)
    return F.linear(F.linear(x, first), last, bias)


class LowRankConv1D(_Factored):
    """transformers' ``Conv1D`` (``y = x @ W + b``, ``W`` stored ``(in, out)``) as a factor.

    The factor is that of the tall matrix a ``Linear`` of the layer would give, so the recorded
    matrix and the factorised one agree; ``weight`` keeps the ``(in, out)`` layout and
    :meth:`to_dense` gives back the original ``Conv1D`` type.
    """

    def __init__(self, factor: LowRankFactor, bias: nn.Parameter | None, dense_type: type):
        super().__init__()
        self.factor = factor
        self.bias = bias
        self.nx, self.nf = factor.orig_shape
        self._dense_type = dense_type

    @classmethod
    def from_dense(cls, conv: nn.Module) -> LowRankConv1D:
        factor = LowRankFactor.from_weight(conv.weight, IN_OUT)
        return cls(factor, conv.bias, type(conv))

    def to_dense(self) -> nn.Module:
        out = self._dense_type(self.nf, self.nx)
        return filled(out, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # stored (in, out) = tall^T when transposed: then W_linear (out, in) is the tall matrix
        return _thin_linear_forward(
            self.factor, x, self.bias, linear_is_tall=self.factor.transposed
        )


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LowRankConv(_Factored):
    """A Conv1d/2d/3d whose weight is a :class:`LowRankFactor` of ``reshape(out, -1)``.

    The factor path runs a rank-k convolution with the conv's stride/padding/dilation, then a
    1x1 convolution that mixes the k channels into the outputs; grouped convolutions always form W.
    """

    def __init__(self, factor: LowRankFactor, bias: nn.Parameter | None, conv: nn.Module) -> None:
        super().__init__()
        self.factor = factor
        self.bias = bias
        self.dims = conv.weight.dim() - 2
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        if conv.padding_mode != "zeros":
            raise ValueError(f"Expected padding_mode 'zeros' but got {conv.padding_mode!r}.")

    @classmethod
    def from_dense(cls, conv: nn.Module) -> LowRankConv:
        return cls(LowRankFactor.from_weight(conv.weight), conv.bias, conv)

    def to_dense(self) -> nn.Module:
        klass = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.dims]
        out = klass(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
        )
        return filled(out, self.weight, self.bias)

    def thin_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank-k conv weight (k, in, *ks), 1x1 mixing weight (out, k, 1, ...))."""
        f, ks = self.factor, self.kernel_size
        if f.transposed:  # W2d = Vh^T S^T U^T: U^T is (k, in*prod(ks))
            first, mix = f.U.T, (f.S @ f.Vh).T
        else:  # W2d = U S Vh
            first, mix = f.Vh, f.U @ f.S
        first = first.reshape(f.rank, self.in_channels, *ks)
        return first, mix.reshape(*mix.shape, *([1] * self.dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dims]
        args = (self.stride, self.padding, self.dilation)
        out_pixels = 1
        f = self.factor
        if self.groups == 1:
            first, mix = self.thin_weights()
            y = conv(x, first, None, *args)
            out_pixels = y[0, 0].numel()
            if not _cheaper_to_form(f, x.shape[0] * out_pixels):
                return conv(y, mix, self.bias)
        return conv(x, self.weight, self.bias, *args, self.groups)


class LowRankMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed in-projection (3E x E) is a :class:`LowRankFactor`.

    ``in_proj_weight`` becomes a property forming the dense weight, so the stock forward (and the
    TransformerEncoderLayer fast path) run unchanged; ``out_proj`` may be a :class:`LowRankLinear`.
    """

    in_proj_weight = property(lambda self: self.in_proj.dense())  # type: ignore[assignment]

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention) -> LowRankMultiheadAttention:
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                "Only packed in-projections (kdim == vdim == embed_dim) are supported."
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(
            {
                k: v
                for k, v in mha.__dict__.items()
                if k not in ("_parameters", "_buffers", "_modules")
            }
        )
        for name, p in mha._parameters.items():
            if name != "in_proj_weight":
                new._parameters[name] = p
        new._buffers.update(mha._buffers)
        new._modules.update(mha._modules)
        new.in_proj = LowRankFactor.from_weight(mha.in_proj_weight)
        return new

    def to_dense(self) -> nn.MultiheadAttention:
        out = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            batch_first=self.batch_first,
            add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn,
        )
        out = out.to(device=self.in_proj.S.device, dtype=self.in_proj.S.dtype)
        state = {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith(("in_proj.", "out_proj."))
        }
        state["in_proj_weight"] = self.in_proj_weight.detach()
        state["out_proj.weight"] = self.out_proj.weight.detach()
        if self.out_proj.bias is not None:
            state["out_proj.bias"] = self.out_proj.bias.detach()
        out.load_state_dict(state)
        return out

    @property
    def rank(self) -> int:
        return self.in_proj.rank


def _conv_kind(module: LowRankConv) -> str:
    return f"conv{module.dims}d"


def _mha_matrices(_: nn.Module) -> list[Matrix]:
    return [Matrix("in_proj_weight", "in_proj")]


# the registry entries of the low-rank layers: recorded (their effective dense W), never
# factorised again
register_layer(LowRankLinear, "linear", (Matrix("weight"),), low_rank=True)
register_layer(LowRankConv, _conv_kind, (Matrix("weight"),), low_rank=True)
register_layer(LowRankConv1D, "linear", (Matrix("weight", orientation=IN_OUT),), low_rank=True)
register_layer(LowRankMultiheadAttention, "mha", _mha_matrices, low_rank=True)
