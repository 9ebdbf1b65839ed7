"""In-place model surgery: ``factorize_(model, config, filter_fn)`` and ``densify_(model)``.

Which module types factorise, and into what, is the layer registry's (:mod:`basis_stability.
registry`): the same table the recorder reads. On top of it, eligibility follows the reference
code, as options: linear layers whose tall aspect ratio m/n is over ``aspect_limit`` stay
full-rank (usually the classifier head), the first and/or last eligible layer can be kept
full-rank, names can be included or excluded, and ``filter_fn(name, module)`` has the last word.
Every registered layer that is not converted is reported with its reason.

``aspect_rule="reference"`` applies the reference code's own rules instead (the reference preset
of :class:`~basis_stability.training.oialr.OIALRConfig`): only ``Linear``, ``Conv1d``/``Conv2d``
and ``MultiheadAttention`` are candidates; a Linear is converted iff ``min(shape) >
max(shape) / aspect_limit`` (strict), a convolution is skipped iff its fan-in ``in * prod(kernel)``
is below ``out / aspect_limit`` (one-sided), attention always qualifies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, Message, NoEligibleLayersError
from ..recommend.eligibility import (  # the rules on names and shapes; re-exported here
    ASPECT_RULES,  # noqa: F401
    KEPT_FIRST,
    KEPT_LAST,
    FactorizeConfig,
    by_name,
    eligible_by_shape,  # noqa: F401
    name_reason,
    shape_reason,
)
from ..registry import lookup, tall_shape
from ..views import unwrap_model
from .layers import LowRankConv, LowRankConv1D, LowRankLinear, LowRankMultiheadAttention

LOW_RANK_TYPES = (LowRankLinear, LowRankConv, LowRankConv1D, LowRankMultiheadAttention)


@dataclass
class SurgeryReport:
    """What :func:`factorize_` did: converted modules by name, and skipped ones with reasons."""

    converted: dict[str, nn.Module] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    swapped: list[tuple[nn.Parameter, nn.Module]] = field(default_factory=list)  # old W -> new

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layers: {', '.join(self.converted)}"]
        lines += [f"  kept full-rank {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def _reason(name: str, module: nn.Module, cfg: FactorizeConfig) -> str | None:
    """Why a factorisable ``module`` stays full-rank under ``cfg``, or None."""
    if cfg.aspect_rule == "reference":
        return name_reason(name, cfg) or _reference_reason(module, cfg.aspect_limit)
    entry = lookup(module)
    kind, shape = entry.kind_of(module), (1, 1)
    if kind == "linear":  # the only kind whose shape decides
        shape, _ = tall_shape(module.weight.shape, entry.matrices_of(module)[0].orientation)
    return shape_reason(name, kind, shape, cfg)


def _reference_reason(module: nn.Module, limit: float) -> str | None:
    """The reference code's eligibility (OIALR @ e9e885d, ``OIALRModel._replace_layers``)."""
    if isinstance(module, nn.MultiheadAttention):
        return None
    if isinstance(module, nn.Linear):
        small, large = min(module.weight.shape), max(module.weight.shape)
        if small > large / limit:
            return None
        return f"min dimension {small} <= {large}/{limit:g} (the reference's Linear rule)"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out, fan_in = module.weight.shape[0], module.weight[0].numel()
        if fan_in < out / limit:
            return f"fan-in {fan_in} < {out}/{limit:g} outputs (the reference's conv rule)"
        return None
    return (
        f"the reference converts only Linear, Conv1d/2d and MultiheadAttention, "
        f"not {type(module).__name__}"
    )


def _refuse_named(name: str, module: nn.Module, why: str, cfg: FactorizeConfig) -> None:
    """A layer named exactly in ``include`` that cannot be factorised is an error, not a skip."""
    if name in (cfg.include or ()):
        raise ConfigError(
            f"Expected `include` to name factorisable layers but {name} "
            f"({type(module).__name__}) cannot be factorised: {why}. Drop it from `include`.",
            argument="include",
        )


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Module names holding each parameter (more than one: a tied weight)."""
    found: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                found.setdefault(id(param), []).append(name)
    return found


def _tied(name: str, module: nn.Module, entry, holders: dict[int, list[str]]) -> str | None:
    """Why a layer whose weight another module shares (GPT-2's lm_head and wte) stays dense."""
    param = getattr(module, entry.matrices_of(module)[0].attr)
    others = [n for n in holders.get(id(param), []) if n != name]
    if others:
        return (
            f"its weight is tied to {', '.join(others)} (the same tensor); factorising it "
            "would untie them"
        )
    return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def eligible_layers(
    model: nn.Module,
    cfg: FactorizeConfig,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The (name, module) pairs :func:`factorize_` would convert, and the skipped ones."""
    bare = unwrap_model(model)
    holders = _holders(bare)
    chosen, skipped = [], []
    for name, module in bare.named_modules():
        entry = lookup(module)
        if not name or entry is None or entry.low_rank:
            continue
        why_not = entry.why_not_factorisable(module) or _tied(name, module, entry, holders)
        if why_not is not None:
            _refuse_named(name, module, why_not, cfg)
            if not by_name(name, cfg.exclude):
                skipped.append((name, why_not))
            continue
        reason = _reason(name, module, cfg)
        if reason is None and filter_fn is not None and not filter_fn(name, module):
            reason = "rejected by filter_fn"
        if reason:
            skipped.append((name, reason))
        else:
            chosen.append((name, module))
    if chosen and cfg.keep_first:
        skipped.append((chosen.pop(0)[0], KEPT_FIRST))
    if chosen and cfg.keep_last:
        skipped.append((chosen.pop()[0], KEPT_LAST))
    return chosen, skipped


def kept_all_message(model: nn.Module, skipped: list[tuple[str, str]]) -> Message | None:
    """The error when keep_first/keep_last took every eligible layer, or None when they did not.

    Example:
        >>> kept_all_message(nn.Linear(4, 4), [("fc", KEPT_LAST)])[:60]
        'Expected `keep_last=True` to leave a layer to factorise but '
    """
    kept = [(n, r) for n, r in skipped if r in (KEPT_FIRST, KEPT_LAST)]
    if not kept:
        return None
    reasons = {r for _, r in kept}
    flags = [f for f, r in (("keep_first", KEPT_FIRST), ("keep_last", KEPT_LAST)) if r in reasons]
    names = ", ".join(n for n, _ in kept)
    which = "the only eligible layer" if len(kept) == 1 else f"all {len(kept)} eligible layers"
    who = "it keeps" if len(flags) == 1 else "they keep"
    return Message(
        f"Expected {' and '.join(f'`{f}=True`' for f in flags)} to leave a layer to factorise "
        f"but {who} full-rank {which} of {type(model).__name__} ({names}). Set "
        f"{' or '.join(f'`{f}=False`' for f in flags)}.",
        flags,
    )


def factorize_(
    model: nn.Module,
    config: FactorizeConfig | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> SurgeryReport:
    """Replace eligible layers of ``model`` by exact low-rank equivalents, in place.

    Returns:
        A :class:`SurgeryReport`; its ``swapped`` list pairs each removed dense weight Parameter
        with the module that replaced it (for optimizer surgery).

    Raises:
        NoEligibleLayersError: nothing could be converted; the message lists why.
    """
    cfg = config or FactorizeConfig()
    bare = unwrap_model(model)
    chosen, skipped = eligible_layers(bare, cfg, filter_fn)
    if not chosen:
        kept_all = kept_all_message(bare, skipped)
        if kept_all:
            raise NoEligibleLayersError(kept_all)
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:20]) or "no Linear/Conv/attention layer"
        raise NoEligibleLayersError(
            f"No layer of {type(bare).__name__} can be factorised ({why}). "
            "Relax aspect_limit/keep_first/keep_last or include/exclude."
        )
    report = SurgeryReport(skipped=skipped)
    with torch.no_grad():
        # attention first: its out_proj Linear is converted after it, inside the new module
        for name, module in sorted(chosen, key=lambda nm: nm[0].count(".")):
            entry = lookup(module)
            old_weight = getattr(module, entry.matrices_of(module)[0].attr)
            new = entry.factorize(module)
            _set(bare, name, new)
            report.converted[name] = new
            report.swapped.append((old_weight, new))
    return report


def densify_(model: nn.Module) -> nn.Module:
    """Turn every low-rank layer back into its dense type, in place, and return ``model``.

    Returning the model lets calls chain: ``compare_export(densify_(copy.deepcopy(m)), ...)``.
    The names of the layers it converts are ``list(low_rank_layers(model))`` before the call.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> _ = factorize_(m)
        >>> densify_(m) is m, low_rank_layers(m)
        (True, {})
    """
    bare = unwrap_model(model)
    names = [n for n, m in bare.named_modules() if isinstance(m, LOW_RANK_TYPES)]
    for name in sorted(names, key=lambda n: -n.count(".")):  # inner layers first
        _set(bare, name, bare.get_submodule(name).to_dense())
    return model


def low_rank_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The low-rank layers of ``model`` by name."""
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, LOW_RANK_TYPES)}


def factor_of(module: nn.Module):
    """The :class:`~.layers.LowRankFactor` of a low-rank layer."""
    return module.in_proj if isinstance(module, LowRankMultiheadAttention) else module.factor


def rebuild_low_rank(
    model: nn.Module,
    ranks: dict[str, int],
    config: FactorizeConfig | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> SurgeryReport:
    """Give a dense ``model`` the low-rank layers of a checkpoint taken after conversion.

    The layers named in ``ranks`` (layer name -> k) are factorised and cut to k; every other
    layer stays dense (OIALR keeps a layer dense whose factors would not pay). Their values are
    placeholders until the checkpoint's weights are loaded.

    Raises:
        ConfigError: a layer of ``ranks`` is not factorisable in this model (another model or
            other eligibility options than the checkpoint's).
    """
    chosen, skipped = eligible_layers(model, config or FactorizeConfig(), filter_fn)
    eligible = {name for name, _ in chosen}
    missing = sorted(set(ranks) - eligible)
    if missing:
        raise ConfigError(
            f"Expected the checkpoint's low-rank layers {missing} to be factorisable in this "
            "model but they are not. Resume with the same model and factorisation options."
        )
    # only the checkpoint's layers: an eligible layer it does not name stayed dense there
    report = SurgeryReport(skipped=skipped)
    for name in sorted(ranks, key=lambda n: n.count(".")):  # attention before its out_proj
        old_weight, module = factorize_layer_(model, name)
        report.converted[name] = module
        report.swapped.append((old_weight, module))
    for name, module in report.converted.items():
        factor = factor_of(module)
        k = int(ranks[name])
        if k < factor.rank:
            factor.rotate_and_truncate_(k)
    return report


def factorize_layer_(model: nn.Module, name: str) -> tuple[nn.Parameter, nn.Module]:
    """Factorise the one layer ``name`` exactly (eligibility already decided by the caller).

    Returns:
        ``(old dense weight, new low-rank module)``, for optimizer surgery.
    """
    bare = unwrap_model(model)
    module = bare.get_submodule(name)
    entry = lookup(module)
    if entry is None or entry.low_rank or entry.factorize is None:
        raise ConfigError(
            f"Expected {name} to be a dense layer the registry can factorise but it is "
            f"{type(module).__name__}. Pass the name of a dense Linear, convolution or attention."
        )
    old_weight = getattr(module, entry.matrices_of(module)[0].attr)
    with torch.no_grad():
        new = entry.factorize(module)
    _set(bare, name, new)
    return old_weight, new


def densify_layer_(model: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """Turn the one low-rank layer ``name`` back into its dense type while training.

    Unlike :func:`densify_`, every parameter but the weight is the same Parameter object (the
    optimizer keeps the bias and its state); the new dense weight ``U S Vh`` is trainable.

    Returns:
        ``(old S, new dense weight)``, for optimizer surgery.
    """
    bare = unwrap_model(model)
    module = bare.get_submodule(name)
    if not isinstance(module, LOW_RANK_TYPES):
        raise ConfigError(
            f"Expected {name} to be a low-rank layer but it is {type(module).__name__}."
        )
    old = factor_of(module).S
    with torch.no_grad():
        if isinstance(module, LowRankMultiheadAttention):
            dense = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
            nn.Module.__init__(dense)
            dense.__dict__.update(
                {
                    k: v
                    for k, v in module.__dict__.items()
                    if k not in ("_parameters", "_buffers", "_modules")
                }
            )
            dense._buffers.update(module._buffers)
            dense._modules.update({k: v for k, v in module._modules.items() if k != "in_proj"})
            weight = nn.Parameter(module.in_proj.dense().detach().clone())
            dense._parameters["in_proj_weight"] = weight
            dense._parameters.update(module._parameters)
            # nn.MultiheadAttention registers in_proj_weight first: keep its parameter order
            order = ["in_proj_weight"] + [k for k in dense._parameters if k != "in_proj_weight"]
            dense._parameters = {k: dense._parameters[k] for k in order}
        else:
            dense = module.to_dense()
            dense.bias = module.bias  # the same Parameter: the optimizer keeps it
            weight = dense.weight
    _set(bare, name, dense)
    return old, weight
