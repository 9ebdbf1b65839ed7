"""Layer views: which tall 2-D matrices of a model are recorded (SPEC §1).

The layer registry (:mod:`basis_stability.registry`) says what each module type contributes;
this module walks a model (or a checkpoint's state dict), applies the user's selection and
returns one :class:`LayerView` per recorded matrix, with every skipped layer and its reason.

    Linear (out, in)             -> W, transposed when out < in
    Conv{1,2,3}d (out, in/g, *k) -> W.reshape(out, -1), transposed when needed
    MultiheadAttention           -> in_proj_weight (3E, E) as one matrix, or q/k/v_proj_weight
                                    (out_proj is an nn.Linear child and is seen as a Linear)
    transformers Conv1D (in, out)-> the matrix a Linear of the layer would give (weight.T)
    Embedding (vocab, dim)       -> only when selected explicitly (by type or by name pattern);
                                    a head tied to it (GPT-2's lm_head) counts as the embedding

Example:
    >>> import torch.nn as nn
    >>> sel = select_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> [(v.name, v.shape, v.transposed) for v in sel.views]
    [('0', (8, 4), False), ('2', (8, 2), True)]
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError, NoEligibleLayersError, Shown, a_or_an, expected
from .registry import (
    OUT_IN,
    Matrix,
    known_kinds,
    lookup,
    lookup_type,
    register_view,
    tall_shape,
    to_tall,
)

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


@dataclass(frozen=True)
class LayerView:
    """One recorded matrix of a model.

    Attributes:
        name: the layer's name: the fully-qualified module name, plus a suffix such as
            ``.in_proj`` for modules with several matrices.
        param_name: the parameter's key in the model's ``state_dict``.
        kind: ``linear``, ``conv2d``, ``mha``, ``embedding``, ... (see
            :func:`~basis_stability.registry.register_layer`).
        orig_shape: the parameter's own shape.
        shape: the tall matrix shape ``(m, n)``, ``m >= n``.
        transposed: whether the tall matrix is the transpose of ``reshape(orig_shape[0], -1)``.
        orientation: how the parameter is stored: ``"out_in"`` (torch.nn) or ``"in_out"``
            (transformers' Conv1D).
    """

    name: str
    param_name: str
    kind: str
    orig_shape: tuple[int, ...]
    shape: tuple[int, int]
    transposed: bool
    orientation: str = OUT_IN

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The tall ``(m, n)`` matrix of ``weight`` (a tensor of shape ``orig_shape``)."""
        return to_tall(weight, self.transposed)

    @classmethod
    def of(
        cls,
        name: str,
        param_name: str,
        kind: str,
        orig_shape: Sequence[int],
        orientation: str = OUT_IN,
    ) -> LayerView:
        shape, transposed = tall_shape(orig_shape, orientation)
        orig = tuple(int(d) for d in orig_shape)
        return cls(name, param_name, kind, orig, shape, transposed, orientation)


@dataclass
class Selection:
    """The outcome of a layer selection: what is recorded, and what is not and why."""

    views: list[LayerView]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def describe_skipped(self) -> str:
        return "\n".join(f"  {name}: {reason}" for name, reason in self.skipped)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Raises:
        ConfigError: ``model`` is not a ``torch.nn.Module`` (every stage takes the model here).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            expected(
                "model",
                "a torch.nn.Module",
                Shown(a_or_an(type(model).__name__)),
                "Pass the network itself (for a state dict, load it into its model first).",
            )
        )
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
    known = known_kinds()
    for t in types:
        if isinstance(t, type):
            entry = lookup_type(t)
            if entry is None or not isinstance(entry.kind, str):
                raise ConfigError(
                    f"Expected `types` to hold supported layer types but got {t!r}."
                    f" Supported: {', '.join(sorted(known))}.",
                    argument="types",
                )
            wanted.add(entry.kind)
            continue
        name = str(t).lower()
        aliases = {"multiheadattention": "mha", "conv": "conv*"}
        name = aliases.get(name, name)
        hits = {k for k in known if fnmatch.fnmatch(k, name)}
        if not hits:
            raise ConfigError(
                f"Expected `types` to hold supported layer types but got {t!r}."
                f" Supported: {', '.join(sorted(known))}.",
                argument="types",
            )
        wanted |= hits
    return wanted


@dataclass
class _Filter:
    include: list[re.Pattern[str]]
    exclude: list[re.Pattern[str]]
    kinds: set[str] | None
    exact_names: frozenset[str] = frozenset()  # include patterns that are plain names

    def reason_to_skip(self, name: str, kind: str, opt_in: bool = False) -> str | None:
        if self.exclude and _matches(name, self.exclude):
            return "excluded by an `exclude` pattern"
        if self.include and not _matches(name, self.include):
            return "not matched by any `include` pattern"
        if self.kinds is not None and kind not in self.kinds:
            return f"type {kind!r} not selected by `types`"
        named = name in self.exact_names  # a wildcard such as "*" does not opt an embedding in
        chosen = self.kinds is not None and kind in self.kinds
        if opt_in and not (named or chosen):
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
            f"{candidates}. Widen `include` or `types`, or narrow `exclude`.",
            argument=("include", "exclude", "types"),
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
    candidates, skipped = _candidates(bare)
    holders: dict[int, list[_Candidate]] = {}
    for cand in candidates:
        holders.setdefault(id(cand.param), []).append(cand)
    views: list[LayerView] = []
    recorded: dict[int, _Candidate] = {}
    for cand in candidates:
        tied = holders[id(cand.param)]
        opt_in = any(c.opt_in for c in tied)  # a head tied to an embedding is the embedding
        kind = next((c.kind for c in tied if c.opt_in), cand.kind)
        reason = flt.reason_to_skip(cand.name, kind, opt_in)
        if reason is None and id(cand.param) in recorded:
            reason = _tied_twice(recorded[id(cand.param)], cand, flt)
        if reason:
            if len(tied) > 1 and not reason.startswith("tied"):
                others = ", ".join(c.name for c in tied if c is not cand)
                reason += f" (tied: {others} hold the same tensor)"
            skipped.append((cand.name, reason))
            continue
        recorded[id(cand.param)] = cand
        orientation = cand.matrix.orientation
        views.append(LayerView.of(cand.name, cand.param_name, kind, cand.param.shape, orientation))
    order = {name or "<root>": i for i, (name, _) in enumerate(bare.named_modules())}
    place = {c.name: order.get(c.param_name.rpartition(".")[0] or "<root>", 0) for c in candidates}
    skipped.sort(key=lambda entry: place.get(entry[0], order.get(entry[0], 0)))  # module order
    return _finish(views, skipped, f"model {type(bare).__name__}")


@dataclass
class _Candidate:
    """One matrix the registry finds in a model, before the user's selection."""

    name: str
    param_name: str
    kind: str
    matrix: Matrix
    param: torch.Tensor
    opt_in: bool


def _candidates(bare: nn.Module) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Every registered matrix of ``bare`` in module order, and the modules the registry lacks."""
    found, skipped = [], []
    for mod_name, module in bare.named_modules():
        entry = lookup(module)
        if entry is None:
            own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
            if own:
                why = f"no matrix view for {type(module).__name__} ({', '.join(own)})"
                skipped.append((mod_name or "<root>", why))
            continue
        kind = entry.kind_of(module)
        for matrix in entry.matrices_of(module):
            suffix, attr = matrix.suffix, matrix.attr
            name = f"{mod_name}.{suffix}" if suffix and mod_name else (suffix or mod_name or attr)
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor) or param.dim() < 2:
                skipped.append((name, f"{attr} is not a matrix"))
                continue
            _check_orientation(name, module, matrix, tuple(param.shape))
            param_name = f"{mod_name}.{attr}" if mod_name else attr
            found.append(_Candidate(name, param_name, kind, matrix, param, entry.opt_in))
    return found, skipped


def _declared_io(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) features a module declares itself (Linear, transformers' Conv1D), if any."""
    for out_attr, in_attr in (("out_features", "in_features"), ("nf", "nx")):
        n_out, n_in = getattr(module, out_attr, None), getattr(module, in_attr, None)
        if isinstance(n_out, int) and isinstance(n_in, int):
            return n_out, n_in
    return None


def _check_orientation(name: str, module: nn.Module, matrix: Matrix, shape: tuple) -> None:
    """Refuse an orientation that the weight's shape (or the module's own sizes) contradicts."""
    kind = type(module).__name__
    try:
        tall_shape(shape, matrix.orientation)
    except ConfigError as exc:
        raise ConfigError(f"Layer {name} ({kind}): {exc}") from None
    io = _declared_io(module) if len(shape) == 2 else None
    if io is None or io[0] == io[1]:
        return
    n_out, n_in = io
    expected = (n_out, n_in) if matrix.orientation == OUT_IN else (n_in, n_out)
    if shape != expected:
        other = "in_out" if matrix.orientation == OUT_IN else "out_in"
        raise ConfigError(
            f"Expected {matrix.attr} of layer {name} ({kind}, {n_out} outputs, {n_in} inputs) "
            f"stored {matrix.orientation!r} to have shape {expected} but it is {shape}: the "
            f"registered orientation contradicts the weight. Register {kind} with "
            f"orientation={other!r}."
        )


def _tied_twice(first: _Candidate, cand: _Candidate, flt: _Filter) -> str:
    """The skip reason of a second holder of a recorded tensor; an error if both were named."""
    if first.name in flt.exact_names and cand.name in flt.exact_names:
        raise ConfigError(
            f"Expected `include` to name each tensor once but {cand.name} and {first.name} are "
            f"the same tensor ({cand.param_name} is tied to {first.param_name}). A tied weight "
            "is recorded once: include only one of the two names.",
            argument="include",
        )
    return f"tied to {first.name} (the same tensor): recorded once, as {first.name}"


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
