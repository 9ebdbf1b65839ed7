"""The layer registry: one table from module type to what every stage needs to know (SPEC §1).

Each entry says, for one module type: its *kind* (stored with every recorded layer), its
*matrices* (parameter attribute and storage orientation), how it *factorises* into a low-rank
layer or why it cannot, whether it is recorded only when asked for (*opt-in*), and how to count
its multiply-adds. The recorder, the analysis, :func:`~basis_stability.lowrank.factorize_`, the
OIALR trainer and the export all read this table, so a layer means the same thing everywhere.

    type                  kind       matrix (storage)             factorised as
    nn.Linear             linear     weight (out, in)             LowRankLinear
    nn.Conv1d/2d/3d       convNd     weight (out, in/g, *k)       LowRankConv (groups=1, zeros)
    nn.MultiheadAttention mha        in_proj_weight (3E, E)       LowRankMultiheadAttention
                                     or q/k/v_proj_weight         refused (separate q/k/v)
    nn.Embedding          embedding  weight (vocab, dim), opt-in  refused (a lookup table)
    transformers Conv1D   linear     weight (in, out)             LowRankConv1D

transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) is matched by its qualified
name, so transformers is never imported here. Its weight is stored ``(in, out)``: the tall matrix
is the one a ``Linear`` of the same layer would give (``weight.T`` seen as ``(out, in)``).

Adding a type is one :func:`register_layer` call (plus its tests)::

    register_layer(MyProj, kind="linear", matrices=[Matrix("kernel", orientation=IN_OUT)],
                   refuse="MyProj has no low-rank form yet")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "IN_OUT",
    "OUT_IN",
    "LayerType",
    "Matrix",
    "lookup",
    "lookup_type",
    "register_layer",
    "register_view",
    "tall_matrix",
    "tall_shape",
    "to_tall",
]

OUT_IN = "out_in"  # weight[out, in, *kernel]: torch.nn's layout
IN_OUT = "in_out"  # weight[in, out]: transformers' Conv1D (y = x @ W + b)
ORIENTATIONS = (OUT_IN, IN_OUT)


def tall_shape(
    orig_shape: Sequence[int], orientation: str = OUT_IN
) -> tuple[tuple[int, int], bool]:
    """Return ``((m, n), transposed)`` for a weight of ``orig_shape`` (SPEC §1).

    The output dimension stays first and the rest is folded; the matrix is transposed when it
    would otherwise be wide, so that always ``m >= n``. ``transposed`` is relative to the stored
    parameter seen as ``reshape(orig_shape[0], -1)``. For an ``IN_OUT`` weight ``(in, out)`` the
    tall matrix is that of its ``(out, in)`` transpose, so a square one is stored transposed.

    Example:
        >>> tall_shape((8, 4)), tall_shape((4, 4)), tall_shape((4, 4), IN_OUT)
        (((8, 4), False), ((4, 4), False), ((4, 4), True))
    """
    dims = [int(d) for d in orig_shape]
    if orientation == IN_OUT:
        if len(dims) != 2:
            raise ConfigError(
                f"Expected a 2-D weight for orientation {IN_OUT!r} but got shape {tuple(dims)}. "
                f"Declare orientation {OUT_IN!r} for weights laid out (out, in, *kernel)."
            )
        n_in, n_out = dims
        return ((n_out, n_in), True) if n_out >= n_in else ((n_in, n_out), False)
    if orientation != OUT_IN:
        raise ConfigError(_bad_orientation(orientation))
    rows, cols = dims[0], math.prod(dims[1:])
    return ((cols, rows), True) if rows < cols else ((rows, cols), False)


def to_tall(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a weight of any rank as its tall 2-D matrix (no copy where possible)."""
    mat = weight.reshape(weight.shape[0], -1)
    return mat.T if transposed else mat


def _bad_orientation(value: object) -> str:
    return (
        f"Expected `orientation` to be {OUT_IN!r} (weight stored (out, in), as torch.nn does) "
        f"or {IN_OUT!r} (stored (in, out), as transformers' Conv1D) but got {value!r}."
    )


@dataclass(frozen=True)
class Matrix:
    """One weight matrix of a layer type.

    Attributes:
        attr: the parameter's attribute on the module (``"weight"``, ``"in_proj_weight"``).
        suffix: ``""`` names the layer after the module; otherwise it is ``f"{module}.{suffix}"``.
        orientation: how the parameter is stored: ``OUT_IN`` or ``IN_OUT``.
    """

    attr: str
    suffix: str = ""
    orientation: str = OUT_IN

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(_bad_orientation(self.orientation))


Kind = str | Callable[[nn.Module], str]
Matrices = Sequence[Matrix] | Callable[[nn.Module], Sequence[Matrix]]
Refusal = str | Callable[[nn.Module], str | None] | None


@dataclass(frozen=True)
class LayerType:
    """What every stage knows about one module type (see :func:`register_layer`)."""

    kind: Kind
    matrices: Matrices
    factorize: Callable[[nn.Module], nn.Module] | None = None
    refuse: Refusal = None
    opt_in: bool = False
    low_rank: bool = False
    macs: Callable[[nn.Module, torch.Tensor], int] | None = None

    def kind_of(self, module: nn.Module) -> str:
        return self.kind(module) if callable(self.kind) else self.kind

    def matrices_of(self, module: nn.Module) -> list[Matrix]:
        found = self.matrices(module) if callable(self.matrices) else self.matrices
        return list(found)

    def why_not_factorisable(self, module: nn.Module) -> str | None:
        """None when :attr:`factorize` applies to ``module``, else the reason it does not."""
        if self.low_rank:
            return "already low-rank"
        reason = self.refuse(module) if callable(self.refuse) else self.refuse
        if reason is None and self.factorize is None:
            reason = f"{type(module).__name__} has no low-rank form"
        return reason


_BY_TYPE: dict[type, LayerType] = {}
_BY_NAME: dict[str, LayerType] = {}  # "package.module.Class" for types not imported here


def _qualname(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def register_layer(
    module_type: type | str,
    kind: Kind,
    matrices: Matrices,
    *,
    factorize: Callable[[nn.Module], nn.Module] | None = None,
    refuse: Refusal = None,
    opt_in: bool = False,
    low_rank: bool = False,
    macs: Callable[[nn.Module, torch.Tensor], int] | None = None,
    replace: bool = False,
) -> LayerType:
    """Teach every stage one module type.

    Args:
        module_type: the ``nn.Module`` subclass (subclasses match too), or its qualified name
            ``"package.module.Class"`` to match without importing the package.
        kind: a short name stored with each recorded layer (``"linear"``), or a function of the
            module giving it.
        matrices: the :class:`Matrix` entries of the type, or a function of the module giving
            them (e.g. attention with packed or separate projections).
        factorize: ``module -> low-rank module`` with the same outputs; None when it has none.
        refuse: why a module of this type cannot be factorised: a sentence, or a function of
            the module returning one or None (e.g. grouped convolutions).
        opt_in: recorded only when selected by type or exact name (embeddings).
        low_rank: a low-rank layer: recorded (its effective weight), never factorised again.
        macs: ``(module, output) -> multiply-adds`` of one forward call, for the export's count.
        replace: allow replacing an existing entry of ``module_type``.

    Raises:
        ConfigError: ``module_type`` is registered already and ``replace`` is False.
    """
    table, key = (_BY_NAME if isinstance(module_type, str) else _BY_TYPE), module_type
    if key in table and not replace:
        shown = key if isinstance(key, str) else key.__name__
        raise ConfigError(
            f"Expected `module_type` to be a type the layer registry does not know yet but "
            f"{shown} is registered already. Pass `replace=True` to change its entry.",
            argument=("module_type", "replace"),
        )
    if not callable(matrices):
        matrices = tuple(matrices)
        for entry in matrices:
            if not isinstance(entry, Matrix):
                raise ConfigError(
                    f"Expected `matrices` to hold Matrix entries but got {entry!r}. "
                    "Use Matrix('weight', orientation=...).",
                    argument="matrices",
                )
    entry = LayerType(kind, matrices, factorize, refuse, opt_in, low_rank, macs)
    table[key] = entry
    return entry


def register_view(
    module_type: type | str,
    kind: Kind,
    handler: Callable[[nn.Module], list[tuple[str, str]]],
    orientation: str = OUT_IN,
    *,
    replace: bool = True,
) -> LayerType:
    """Record a module type (no factorisation): ``handler(module) -> [(suffix, attribute)]``.

    The older, recording-only form of :func:`register_layer`; ``orientation`` applies to every
    matrix the handler names. Re-registering a type replaces its entry.
    """
    if orientation not in ORIENTATIONS:
        raise ConfigError(_bad_orientation(orientation))

    def matrices(module: nn.Module) -> list[Matrix]:
        return [Matrix(attr, suffix, orientation) for suffix, attr in handler(module)]

    return register_layer(module_type, kind, matrices, replace=replace)


def lookup(module: nn.Module) -> LayerType | None:
    """The entry of ``module``'s type or of its nearest registered base class."""
    return lookup_type(type(module))


def lookup_type(module_type: type) -> LayerType | None:
    """The entry of ``module_type`` or of its nearest registered base class."""
    for klass in module_type.__mro__:
        entry = _BY_TYPE.get(klass) or _BY_NAME.get(_qualname(klass))
        if entry is not None:
            return entry
    return None


def tall_matrix(module: nn.Module) -> torch.Tensor:
    """The first matrix of a registered ``module`` as its tall ``(m, n)`` view (the one
    :func:`~basis_stability.lowrank.factorize_` factorises), as the recorder stores it.

    Raises:
        ConfigError: the registry does not know ``module``'s type.
    """
    entry = lookup(module)
    if entry is None:
        raise ConfigError(
            f"Expected a module type the layer registry knows but got {type(module).__name__}. "
            "Register it with basis_stability.registry.register_layer."
        )
    matrix = entry.matrices_of(module)[0]
    weight = getattr(module, matrix.attr)
    _, transposed = tall_shape(weight.shape, matrix.orientation)
    return to_tall(weight, transposed)


def known_kinds() -> set[str]:
    """The kinds of the entries that name theirs as a string (for type filters)."""
    entries = [*_BY_TYPE.values(), *_BY_NAME.values()]
    return {e.kind for e in entries if isinstance(e.kind, str)}


# ---------------------------------------------------------------- the built-in entries
def _low_rank(name: str) -> Callable[[nn.Module], nn.Module]:
    """``from_dense`` of a class of :mod:`basis_stability.lowrank.layers`, imported when called
    (that module builds on this one)."""

    def convert(module: nn.Module) -> nn.Module:
        from .lowrank import layers

        return getattr(layers, name).from_dense(module)

    convert.__qualname__ = f"{name}.from_dense"
    return convert


def _linear_macs(module: nn.Module, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    return output.numel() * module.weight[0].numel()  # in/groups * prod(kernel) per output


def _conv1d_hf_macs(module: nn.Module, output: torch.Tensor) -> int:
    return output.numel() * int(module.weight.shape[0])


def _conv_refusal(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has no low-rank form here"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}: only zero padding is factorised"
    return None


def _mha_matrices(module: nn.Module) -> list[Matrix]:
    if getattr(module, "in_proj_weight", None) is not None:
        return [Matrix("in_proj_weight", "in_proj")]
    return [Matrix(f"{p}_weight", p) for p in ("q_proj", "k_proj", "v_proj")]


def _mha_refusal(module: nn.Module) -> str | None:
    if not module._qkv_same_embed_dim:
        return "attention with separate q/k/v weights (kdim/vdim != embed_dim) is not factorised"
    return None


_WEIGHT = (Matrix("weight"),)

register_layer(
    nn.Linear, "linear", _WEIGHT, factorize=_low_rank("LowRankLinear"), macs=_linear_macs
)
for _dims, _conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
    register_layer(
        _conv,
        f"conv{_dims}d",
        _WEIGHT,
        factorize=_low_rank("LowRankConv"),
        refuse=_conv_refusal,
        macs=_conv_macs,
    )
register_layer(
    nn.MultiheadAttention,
    "mha",
    _mha_matrices,
    factorize=_low_rank("LowRankMultiheadAttention"),
    refuse=_mha_refusal,
)
register_layer(
    nn.Embedding,
    "embedding",
    _WEIGHT,
    refuse="an embedding is a lookup table; factorising it is not supported",
    opt_in=True,
)
register_layer(
    "transformers.pytorch_utils.Conv1D",
    "linear",
    (Matrix("weight", orientation=IN_OUT),),
    factorize=_low_rank("LowRankConv1D"),
    macs=_conv1d_hf_macs,
)
