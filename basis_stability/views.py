"""Layer views: which tall 2-D matrix each layer is (SPEC §1).

One registry maps a module type to the weight parameters it contributes and how each becomes a
matrix. The recorder, the analysis and (later) the factoriser share it, so a layer means the same
thing everywhere.

    Linear (out, in)             -> W, transposed when out < in
    Conv{1,2,3}d (out, in/g, *k) -> W.reshape(out, -1), transposed when needed
    MultiheadAttention           -> in_proj_weight (3E, E) as one matrix, or q/k/v_proj_weight
                                    (out_proj is an nn.Linear child and is seen as a Linear)
    Embedding (vocab, dim)       -> only when selected explicitly (by type or by name pattern)

Example:
    >>> import torch.nn as nn
    >>> sel = select_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [(v.name, v.shape, v.transposed) for v in sel.views]
    [('0', (8, 4), False), ('2', (8, 2), True)]
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, NoEligibleLayersError

__all__ = [
    "Coverage",
    "LayerView",
    "Selection",
    "measure_coverage",
    "register_view",
    "select_layers",
    "select_state_dict",
    "strip_wrapper_prefix",
    "tall_shape",
    "to_tall",
    "unwrap_model",
]

# A handler returns (suffix, parameter attribute) pairs; suffix "" means the layer is the module.
Handler = Callable[[nn.Module], list[tuple[str, str]]]
Kind = str | Callable[[nn.Module], str]
_REGISTRY: dict[type, tuple[Kind, Handler]] = {}
_OPT_IN_KINDS = {"embedding"}


def register_view(module_type: type, kind: Kind, handler: Handler) -> None:
    """Teach the registry how a module type becomes one or more tall matrices.

    Args:
        module_type: the ``nn.Module`` subclass (subclasses of it match too).
        kind: a short name stored with each layer, e.g. ``"linear"`` (or a function of the
            module giving it).
        handler: ``module -> [(suffix, parameter_attribute), ...]``; suffix ``""`` names the
            layer after the module itself, otherwise the layer is ``f"{module}.{suffix}"``.
    """
    _REGISTRY[module_type] = (kind, handler)


def _weight(_: nn.Module) -> list[tuple[str, str]]:
    return [("", "weight")]


def _mha(module: nn.Module) -> list[tuple[str, str]]:
    if getattr(module, "in_proj_weight", None) is not None:
        return [("in_proj", "in_proj_weight")]
    return [(p, f"{p}_weight") for p in ("q_proj", "k_proj", "v_proj")]


register_view(nn.Linear, "linear", _weight)
register_view(nn.Conv1d, "conv1d", _weight)
register_view(nn.Conv2d, "conv2d", _weight)
register_view(nn.Conv3d, "conv3d", _weight)
register_view(nn.MultiheadAttention, "mha", _mha)
register_view(nn.Embedding, "embedding", _weight)


def tall_shape(orig_shape: Sequence[int]) -> tuple[tuple[int, int], bool]:
    """Return ``((m, n), transposed)`` for a weight of ``orig_shape`` (SPEC §1).

    The output dimension stays first, the rest is folded; the matrix is transposed when it would
    otherwise be wide, so that always ``m >= n``.
    """
    rows = int(orig_shape[0])
    cols = 1
    for d in orig_shape[1:]:
        cols *= int(d)
    if rows < cols:
        return (cols, rows), True
    return (rows, cols), False


def to_tall(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a weight of any rank as its tall 2-D matrix (no copy where possible)."""
    mat = weight.reshape(weight.shape[0], -1)
    return mat.T if transposed else mat


@dataclass(frozen=True)
class LayerView:
    """One recorded matrix of a model.

    Attributes:
        name: the layer's name: the fully-qualified module name, plus a suffix such as
            ``.in_proj`` for modules with several matrices.
        param_name: the parameter's key in the model's ``state_dict``.
        kind: ``linear``, ``conv2d``, ``mha``, ``embedding``, ... (see :func:`register_view`).
        orig_shape: the parameter's own shape.
        shape: the tall matrix shape ``(m, n)``, ``m >= n``.
        transposed: whether the tall matrix is the transpose of ``reshape(out, -1)``.
    """

    name: str
    param_name: str
    kind: str
    orig_shape: tuple[int, ...]
    shape: tuple[int, int]
    transposed: bool

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The tall ``(m, n)`` matrix of ``weight`` (a tensor of shape ``orig_shape``)."""
        return to_tall(weight, self.transposed)

    @classmethod
    def of(cls, name: str, param_name: str, kind: str, orig_shape: Sequence[int]) -> LayerView:
        shape, transposed = tall_shape(orig_shape)
        return cls(name, param_name, kind, tuple(int(d) for d in orig_shape), shape, transposed)


@dataclass
class Selection:
    """The outcome of a layer selection: what is recorded, and what is not and why."""

    views: list[LayerView]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def describe_skipped(self) -> str:
        return "\n".join(f"  {name}: {reason}" for name, reason in self.skipped)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _compile_patterns(patterns: Iterable[str] | None, arg: str) -> list[re.Pattern[str]]:
    """Patterns are globs (``features.*``) unless prefixed ``re:`` (``re:blocks\\.[0-3]\\..*``)."""
    compiled = []
    for p in patterns or ():
        try:
            compiled.append(re.compile(p[3:] if p.startswith("re:") else fnmatch.translate(p)))
        except re.error as exc:
            raise ConfigError(
                f"Expected `{arg}` to hold valid patterns but {p!r} is not a regular expression"
                f" ({exc}). Fix the pattern or drop the `re:` prefix to use a glob."
            ) from None
    return compiled


def _matches(name: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def _type_filter(types: Iterable[str | type] | None) -> set[str] | None:
    if types is None:
        return None
    wanted = set()
    known = {k for k, _ in _REGISTRY.values() if isinstance(k, str)}
    for t in types:
        if isinstance(t, type):
            entry = next((v for k, v in _REGISTRY.items() if issubclass(t, k)), None)
            if entry is None:
                raise ConfigError(
                    f"Expected `types` to hold supported layer types but got {t!r}."
                    f" Supported: {', '.join(sorted(known))}."
                )
            wanted.add(entry[0])
            continue
        name = str(t).lower()
        aliases = {"multiheadattention": "mha", "conv": "conv*"}
        name = aliases.get(name, name)
        hits = {k for k in known if fnmatch.fnmatch(k, name)}
        if not hits:
            raise ConfigError(
                f"Expected `types` to hold supported layer types but got {t!r}."
                f" Supported: {', '.join(sorted(known))}."
            )
        wanted |= hits
    return wanted


def _lookup(module: nn.Module) -> tuple[str, Handler] | None:
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


@dataclass
class _Filter:
    include: list[re.Pattern[str]]
    exclude: list[re.Pattern[str]]
    kinds: set[str] | None
    exact_names: frozenset[str] = frozenset()  # include patterns that are plain names

    def reason_to_skip(self, name: str, kind: str) -> str | None:
        if self.exclude and _matches(name, self.exclude):
            return "excluded by an --exclude pattern"
        if self.include and not _matches(name, self.include):
            return "not matched by any --include pattern"
        if self.kinds is not None and kind not in self.kinds:
            return f"type {kind!r} not selected by `types`"
        named = name in self.exact_names  # a wildcard such as "*" does not opt an embedding in
        chosen = self.kinds is not None and kind in self.kinds
        if kind in _OPT_IN_KINDS and not (named or chosen):
            return (
                f"{kind} layers are recorded only when selected (types=['{kind}'] or an include "
                "pattern that is exactly the layer's name)"
            )
        return None


def _make_filter(include, exclude, types) -> _Filter:
    exact = frozenset(p for p in include or () if not re.search(r"[*?\[]", p) and ":" not in p)
    return _Filter(
        _compile_patterns(include, "include"),
        _compile_patterns(exclude, "exclude"),
        _type_filter(types),
        exact,
    )


def _finish(views: list[LayerView], skipped: list[tuple[str, str]], source: str) -> Selection:
    if not views:
        candidates = "; ".join(f"{n} ({r})" for n, r in skipped[:40]) or "none"
        raise NoEligibleLayersError(
            f"No layer of {source} was selected. Candidates and why each was skipped: "
            f"{candidates}. Widen --include/--types or check the names with `bstab record --list`."
        )
    return Selection(views, skipped)


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str | type] | None = None,
) -> Selection:
    """Pick the layers of ``model`` to record, by fully-qualified name and by type.

    Args:
        model: any module; DDP, DataParallel and ``torch.compile`` wrappers are unwrapped so that
            names match the bare model.
        include: glob patterns (or ``re:``-prefixed regular expressions) a layer name must match.
        exclude: patterns that drop a layer even when included.
        types: layer kinds to keep (``"linear"``, ``"conv2d"``, ``"conv*"``, ``"mha"``,
            ``"embedding"``, or module classes). Embeddings are kept only when named here or
            when an ``include`` pattern is exactly their name (a wildcard is not enough).

    Returns:
        A :class:`Selection` with the views in module order and every skipped layer with its
        reason (modules with parameters but no matrix view are reported too).

    Raises:
        NoEligibleLayersError: nothing was selected; the message lists the candidates.
    """
    flt = _make_filter(include, exclude, types)
    bare = unwrap_model(model)
    views, skipped = [], []
    for mod_name, module in bare.named_modules():
        entry = _lookup(module)
        if entry is None:
            own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
            if own:
                skipped.append(
                    (
                        mod_name or "<root>",
                        f"no matrix view for {type(module).__name__} ({', '.join(own)})",
                    )
                )
            continue
        kind, handler = entry
        kind = kind(module) if callable(kind) else kind
        for suffix, attr in handler(module):
            name = f"{mod_name}.{suffix}" if suffix and mod_name else (suffix or mod_name or attr)
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor) or param.dim() < 2:
                skipped.append((name, f"{attr} is not a matrix"))
                continue
            reason = flt.reason_to_skip(name, kind)
            if reason:
                skipped.append((name, reason))
                continue
            param_name = f"{mod_name}.{attr}" if mod_name else attr
            views.append(LayerView.of(name, param_name, kind, param.shape))
    return _finish(views, skipped, f"model {type(bare).__name__}")


@dataclass(frozen=True)
class Coverage:
    """How much of a model's matrix-shaped parameters a selection records.

    Attributes:
        recorded_params: entries of the distinct parameters the selection records.
        eligible_2d_params: entries of all distinct parameters with >= 2 dimensions.
        largest_unrecorded: up to five ``(module name, module type, entries)`` of the modules
            whose >= 2-D parameters are not recorded, largest first.
    """

    recorded_params: int
    eligible_2d_params: int
    largest_unrecorded: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def share(self) -> float:
        """The recorded share of the >= 2-D parameters (1.0 for a model without any)."""
        return self.recorded_params / self.eligible_2d_params if self.eligible_2d_params else 1.0


def measure_coverage(model: nn.Module, views: Sequence[LayerView], top: int = 5) -> Coverage:
    """Count the entries of ``model``'s >= 2-D parameters that ``views`` record.

    Tied parameters (one tensor under two names) count once, and a tied parameter recorded
    under either name counts as recorded.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.Embedding(10, 4))
        >>> cov = measure_coverage(m, select_layers(m).views)
        >>> (cov.recorded_params, cov.eligible_2d_params, cov.largest_unrecorded)
        (32, 72, [('1', 'Embedding', 40)])
    """
    bare = unwrap_model(model)
    recorded = set()
    for view in views:  # by the view's own name: a tied parameter is listed under one name only
        try:
            recorded.add(id(bare.get_parameter(view.param_name)))
        except AttributeError:
            continue
    seen: set[int] = set()
    recorded_n = eligible_n = 0
    unrecorded: list[tuple[str, str, int]] = []
    for mod_name, module in bare.named_modules():
        missing = 0
        for param in module.parameters(recurse=False):
            if param is None or param.dim() < 2 or id(param) in seen:
                continue
            seen.add(id(param))
            eligible_n += param.numel()
            if id(param) in recorded:
                recorded_n += param.numel()
            else:
                missing += param.numel()
        if missing:
            unrecorded.append((mod_name or "<root>", type(module).__name__, missing))
    unrecorded.sort(key=lambda entry: -entry[2])
    return Coverage(recorded_n, eligible_n, unrecorded[:top])


def strip_wrapper_prefix(key: str) -> str:
    """Drop the ``module.``/``_orig_mod.`` prefixes that DDP and torch.compile add to keys."""
    prefixes = ("module.", "_orig_mod.")
    while key.startswith(prefixes):  # in any order: compile(DDP(m)) gives "_orig_mod.module."
        key = key[len(next(p for p in prefixes if key.startswith(p))) :]
    return key


def _kind_from_key(key: str, ndim: int) -> tuple[str, str] | None:
    """Guess (layer name, kind) from a state-dict key; None when it is not a matrix."""
    for attr, suffix in (
        ("in_proj_weight", "in_proj"),
        ("q_proj_weight", "q_proj"),
        ("k_proj_weight", "k_proj"),
        ("v_proj_weight", "v_proj"),
    ):
        if key == attr or key.endswith("." + attr):
            base = key[: -len(attr)].rstrip(".")
            return (f"{base}.{suffix}" if base else suffix), "mha"
    if key != "weight" and not key.endswith(".weight"):
        return None
    name = key[: -len("weight")].rstrip(".") or "weight"
    kinds = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
    return (name, kinds[ndim]) if ndim in kinds else None


def select_state_dict(
    shapes: Mapping[str, Sequence[int]],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str | type] | None = None,
) -> Selection:
    """Like :func:`select_layers`, for a state dict without its model (checkpoint import).

    The kind is read from the key and the rank: 2-D ``*.weight`` is ``linear`` (an embedding
    cannot be told apart from a Linear here; exclude it by name if unwanted), 3/4/5-D is a
    convolution, ``*.in_proj_weight`` is attention. ``module.`` and ``_orig_mod.`` prefixes of
    wrapped models are stripped.

    Args:
        shapes: ``{key: shape}`` of the state dict.
    """
    flt = _make_filter(include, exclude, types)
    views, skipped = [], []
    for key, shape in shapes.items():
        bare = strip_wrapper_prefix(key)
        guess = _kind_from_key(bare, len(shape))
        if guess is None:
            if len(shape) >= 2 or bare.endswith(("weight", "bias")):
                skipped.append((bare, f"not a layer weight matrix (shape {tuple(shape)})"))
            continue
        name, kind = guess
        reason = flt.reason_to_skip(name, kind)
        if reason:
            skipped.append((name, reason))
            continue
        views.append(LayerView.of(name, bare, kind, shape))
    return _finish(views, skipped, "the checkpoint")
