"""Which layers OIALR factorises: pure rules on names, registry kinds and tall shapes, so the
offline plan (from what a run file stores) and the controller (on the live model) agree. The
module-level checks only the live model can make (grouped convolutions, tied weights) are
:mod:`basis_stability.lowrank.surgery`'s."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError, expected

ASPECT_RULES = ("bstab", "reference")
KEPT_FIRST = "first layer kept full-rank (keep_first)"
KEPT_LAST = "last layer kept full-rank (keep_last)"


@dataclass(frozen=True)
class FactorizeConfig:
    """Which layers become low-rank.

    Attributes:
        aspect_limit: Linear layers with tall aspect ratio m/n above this stay full-rank.
        aspect_rule: ``bstab`` (the rule above; every convolution qualifies) or ``reference``
            (the reference code's rules and layer types, see the module docstring).
        keep_first: keep the first eligible layer full-rank.
        keep_last: keep the last eligible layer full-rank.
        include: glob patterns of module names that may be converted (default: all).
        exclude: glob patterns of module names that stay full-rank.
    """

    aspect_limit: float = 10.0
    aspect_rule: str = "bstab"
    keep_first: bool = False
    keep_last: bool = False
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not self.aspect_limit >= 1:
            raise ConfigError(expected("aspect_limit", ">= 1", self.aspect_limit, "Use e.g. 10."))
        if self.aspect_rule not in ASPECT_RULES:
            raise ConfigError(
                expected(
                    "aspect_rule",
                    " or ".join(ASPECT_RULES),
                    self.aspect_rule,
                    "bstab is the default.",
                )
            )


def by_name(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``name`` matches one of the glob ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def name_reason(name: str, cfg: FactorizeConfig) -> str | None:
    """Why ``cfg``'s include/exclude patterns keep the layer ``name`` full-rank, or None."""
    if cfg.exclude and by_name(name, cfg.exclude):
        return "excluded by name"
    if cfg.include and not by_name(name, cfg.include):
        return "not included by name"
    return None


def shape_reason(
    name: str, kind: str, shape: Sequence[int], cfg: FactorizeConfig | None = None
) -> str | None:
    """Why a layer of this registry ``kind`` and tall ``shape`` (m, n) stays full-rank under
    ``cfg``'s name and aspect rules, or None: the rules
    :func:`~basis_stability.lowrank.factorize_` applies, from what a run file stores (so an
    offline plan and the live controller agree).

    An ``embedding`` has no low-rank form. What only the module can tell (a grouped or padded
    convolution, a tied weight, the reference rule's convolution fan-in) is not decided here.

    Example:
        >>> shape_reason("head", "linear", (256, 10))
        'aspect ratio 256/10 = 25.6 > 10'
        >>> shape_reason("fc1", "linear", (64, 32)) is None
        True
    """
    cfg = cfg or FactorizeConfig()
    why = name_reason(name, cfg)
    if why is not None:
        return why
    if kind == "embedding":
        return "an embedding has no low-rank form (a lookup table)"
    if kind != "linear":
        return None
    m, n = max(shape), min(shape)
    if cfg.aspect_rule == "reference":
        if n > m / cfg.aspect_limit:
            return None
        return f"min dimension {n} <= {m}/{cfg.aspect_limit:g} (the reference's Linear rule)"
    if m / n > cfg.aspect_limit:
        return f"aspect ratio {m}/{n} = {m / n:.1f} > {cfg.aspect_limit:g}"
    return None


def eligible_by_shape(
    layers: Sequence[tuple[str, str, Sequence[int]]], cfg: FactorizeConfig | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """The names of the ``(name, kind, tall shape)`` layers
    :func:`~basis_stability.lowrank.factorize_` would convert
    (in the given order, which ``keep_first``/``keep_last`` count in), and the skipped ones with
    their reasons: :func:`shape_reason` per layer, then ``keep_first`` and ``keep_last``."""
    cfg = cfg or FactorizeConfig()
    chosen, skipped = [], []
    for name, kind, shape in layers:
        why = shape_reason(name, kind, shape, cfg)
        if why is None:
            chosen.append(name)
        else:
            skipped.append((name, why))
    if chosen and cfg.keep_first:
        skipped.append((chosen.pop(0), KEPT_FIRST))
    if chosen and cfg.keep_last:
        skipped.append((chosen.pop(), KEPT_LAST))
    return chosen, skipped
