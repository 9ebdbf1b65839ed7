"""Recommend: turn measured stability and spectra into an OIALR plan (delay, interval, beta, ranks).

Plain data in, plain data out; the OIALR trainer consumes :class:`Plan` (or its ``plan.json``).

**Delay rule.** For the "lag" pairs (a, b) (snapshots ``lag`` apart, or a given time apart: see
:mod:`basis_stability.analyze.lag`), the *stable share* at snapshot b is the parameter-weighted
share of layers with ``S(a, b) >= tau``. The delay is the first b from which the stable share
stays ``>= share`` at every later b. Weighting by parameters makes the big layers, where low rank
pays, decide. A layer whose S is NaN at b (its basis is not unique: a rank-deficient or zero
matrix, NaN/Inf weights) is *excluded* at b, neither stable nor unstable: the share is over the
parameters whose S is defined, and the plan's notes name every excluded layer with its reason.
A snapshot where no layer has a defined S cannot meet the rule.

**Beta rule.** At the delay snapshot, for each candidate beta each layer would keep
``r_beta = #{s_i >= beta s_1}`` singular values. Rule ``energy`` (default) picks the largest beta
whose kept spectral energy ``sum_{i<=r} s_i^2 / sum s_i^2`` is ``>= min_energy`` in *every* layer
(no layer loses much of its function); rule ``share`` picks the smallest beta whose trainable share
``sum r_beta^2 / sum m n`` is ``<= target_share`` (a parameter budget).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, expected
from .lowrank.rules import factors_pay, trainable_entries
from .lowrank.surgery import FactorizeConfig, eligible_by_shape

PLAN_VERSION = 1


@dataclass
class PlanConfig:
    """Thresholds of the delay and beta rules (defaults justified in docs/analysis.md)."""

    tau: float = 0.99
    share: float = 0.9
    beta_rule: str = "energy"
    min_energy: float = 0.9
    target_share: float = 0.25
    betas: tuple[float, ...] = tuple(np.round(np.arange(0.01, 0.51, 0.01), 2).tolist())

    def __post_init__(self) -> None:
        for name in ("tau", "share", "min_energy", "target_share"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(expected(name, "in (0, 1]", value, "Use e.g. 0.9."))
        if self.beta_rule not in ("energy", "share"):
            raise ConfigError(
                expected(
                    "beta_rule",
                    "energy or share",
                    self.beta_rule,
                    "energy keeps function; share meets a budget.",
                )
            )
        if not self.betas or not all(0 < b < 1 for b in self.betas):
            raise ConfigError(expected("betas", "values in (0, 1)", self.betas, "Use 0.01-0.5."))


@dataclass
class Plan:
    """What OIALR should do, and the numbers the rules used. Serialised as ``plan.json``."""

    model_class: str
    layers: dict[str, list[int]]  # name -> tall shape [m, n]
    delay_snapshot: int | None
    delay_epoch: float | None
    delay_step: int | None
    interval_snapshots: int
    interval_epochs: float | None
    interval_steps: int | None
    beta: float
    ranks: dict[str, int]
    expected_trainable_share: float
    rules: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION
    # the recorded layers OIALR keeps dense (name -> why): beta, ranks and the expected share
    # are over the others, the layers it factorises
    excluded_layers: dict[str, str] = field(default_factory=dict)
    # the analysis paired unevenly spaced snapshots by a lag in snapshots (its warning is a note)
    uneven_spacing: bool = False

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2, default=_plain) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"Cannot read the plan {path}: {exc}. Pass a plan.json written by `bstab analyze`."
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"Cannot read the plan {path}: it holds a JSON {type(data).__name__}, not an "
                "object. Pass a plan.json written by `bstab analyze`."
            )
        version = data.get("version")
        if isinstance(version, bool) or version != PLAN_VERSION:
            raise ConfigError(
                expected(
                    "plan version",
                    str(PLAN_VERSION),
                    version,
                    "Re-run `bstab analyze` to write a current plan.",
                )
            )
        try:
            plan = cls(**data)
        except TypeError as exc:  # missing or unknown fields
            raise ConfigError(
                f"Cannot read the plan {path}: {exc}. Re-run `bstab analyze` to write it again."
            ) from None
        _check_plan(plan, path)
        return plan


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (what it must be, the check); None is allowed where the check says so
_PLAN_FIELDS: dict[str, tuple[str, Any]] = {
    "model_class": ("a string", lambda v: isinstance(v, str)),
    "delay_snapshot": ("null or an integer >= 0", lambda v: v is None or _is_int(v) and v >= 0),
    "delay_epoch": (
        "null or a finite number >= 0",
        lambda v: v is None or _is_number(v) and v >= 0,
    ),
    "delay_step": ("null or an integer >= 0", lambda v: v is None or _is_int(v) and v >= 0),
    "interval_snapshots": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "interval_epochs": (
        "null or a finite number > 0",
        lambda v: v is None or _is_number(v) and v > 0,
    ),
    "interval_steps": ("null or an integer >= 1", lambda v: v is None or _is_int(v) and v >= 1),
    "beta": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "expected_trainable_share": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "rules": ("an object", lambda v: isinstance(v, dict)),
    "evidence": ("an object", lambda v: isinstance(v, dict)),
    "notes": (
        "a list of strings",
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
    ),
    "excluded_layers": (
        "an object of layer name -> reason",
        lambda v: isinstance(v, dict) and all(isinstance(r, str) for r in v.values()),
    ),
    "uneven_spacing": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_plan(plan: Plan, path: str | Path) -> None:
    """Every field of a loaded plan has the type and range `bstab analyze` writes.

    Raises:
        ConfigError: naming the first bad field, its value and the fix.
    """
    fix = f"Fix it in {path} or re-run `bstab analyze` to write the plan again."
    for name, (wanted, ok) in _PLAN_FIELDS.items():
        value = getattr(plan, name)
        if not ok(value):
            raise ConfigError(expected(name, wanted, value, fix))
    layers, ranks = plan.layers, plan.ranks
    if not isinstance(layers, dict) or not all(
        isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)
        for shape in layers.values()
    ):
        raise ConfigError(
            expected("layers", "an object of layer name -> [m, n] (positive integers)", layers, fix)
        )
    # a rank is 0 only for an all-zero matrix (nothing to keep), so 0 is allowed
    if not isinstance(ranks, dict) or not all(_is_int(r) and r >= 0 for r in ranks.values()):
        raise ConfigError(
            expected("ranks", "an object of layer name -> rank (an integer >= 0)", ranks, fix)
        )
    unknown = {n: r for n, r in ranks.items() if n not in layers}
    if unknown:
        raise ConfigError(expected("ranks", "ranks of the plan's own `layers`", unknown, fix))
    too_big = {n: r for n, r in ranks.items() if r > min(layers[n])}
    if too_big:
        raise ConfigError(
            expected("ranks", "at most min(m, n) of each layer's shape", too_big, fix)
        )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value)}")


def first_lasting(ok: np.ndarray) -> int | None:
    """Index of the first element from which ``ok`` is True to the end; None if the last is not.

    Example:
        >>> first_lasting(np.array([False, True, False, True, True]))
        3
    """
    tail_ok = np.logical_and.accumulate(np.asarray(ok, dtype=bool)[::-1])[::-1]
    return int(np.argmax(tail_ok)) if tail_ok.any() else None


def choose_delay(network: pd.DataFrame, share: float) -> tuple[int | None, str]:
    """First snapshot b from which ``stable_share >= share`` holds at every later b.

    ``stable_share`` is over the layers whose S is defined (``known_share`` of the parameters,
    the rest named in ``excluded``); the reason names what was left out at the last snapshot.
    """
    if network.empty:
        return None, "no stability pairs (a run needs two snapshots)"
    first = first_lasting((network["stable_share"] >= share).to_numpy())
    if first is None:
        last = network.iloc[-1]
        if pd.isna(last["stable_share"]):
            return None, (
                f"not decidable at the last snapshot {int(last['snapshot'])}: no layer has a "
                f"defined S there ({_excluded(last)})"
            )
        why = (
            f"not stable yet: at the last snapshot {float(last['stable_share']):.0%} of "
            f"parameters are in stable layers (< {share:.0%}); train longer or lower tau"
        )
        if _excluded(last):
            why += (
                f" (measured on the {float(last['known_share']):.0%} of parameters whose S is "
                f"defined; excluded, not counted as unstable: {_excluded(last)})"
            )
        return None, why
    return int(network["snapshot"].to_numpy()[first]), "delay rule met"


def _excluded(row: pd.Series) -> str:
    value = row.get("excluded", "")
    return value if isinstance(value, str) else ""


def excluded_notes(network: pd.DataFrame) -> list[str]:
    """One note per distinct set of layers whose S is NaN, with the snapshots it holds at."""
    if network.empty or "excluded" not in network:
        return []
    groups: dict[str, list[int]] = {}
    for snap, why in zip(network["snapshot"], network["excluded"]):
        if isinstance(why, str) and why:
            groups.setdefault(why, []).append(int(snap))
    return [
        f"S undefined, so excluded from the stable share (not counted as unstable) at "
        f"snapshot(s) {_spans(snaps)}: {why}"
        for why, snaps in groups.items()
    ]


def _spans(snaps: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[list[int]] = []
    for s in snaps:
        if out and out[-1][-1] + 1 == s:
            out[-1].append(s)
        else:
            out.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


def kept_energy(s: np.ndarray, rank: int) -> float:
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    return float(e[:rank].sum() / total) if total > 0 else math.nan


def _ranks_at(spectra: dict[str, np.ndarray], beta: float) -> dict[str, int]:
    """``r_beta = #{s_i >= beta s_1}`` per layer; 0 for a zero matrix (nothing to keep)."""
    return {name: int((s >= beta * s[0]).sum()) if s[0] > 0 else 0 for name, s in spectra.items()}


def expected_share(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    """Trainable share after OIALR of layers cut to ``ranks``: ``k^2`` each, or ``m n`` for a
    layer whose factors would not pay (it stays dense, as the controller keeps it)."""
    total = sum(m * n for m, n in shapes.values())
    kept = sum(
        trainable_entries(r if factors_pay(r, *shapes[name]) else None, *shapes[name])
        for name, r in ranks.items()
    )
    return kept / total


def beta_curve(
    spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], betas: tuple[float, ...]
) -> pd.DataFrame:
    """Trainable share and kept energy for each candidate beta, from one snapshot's spectra.

    The share is the controller's: a layer whose beta rank would not pay as thin factors
    (``k (m + n) >= m n``) stays dense and counts all its entries (:func:`expected_share`).
    """
    rows = []
    for beta in betas:
        ranks = _ranks_at(spectra, beta)
        energies = [kept_energy(spectra[name], r) for name, r in ranks.items()]
        rows.append(
            {
                "beta": beta,
                "trainable_share": expected_share(ranks, shapes),
                "min_energy": float(np.nanmin(energies)),
                "mean_energy": float(np.nanmean(energies)),
            }
        )
    return pd.DataFrame(rows)


def choose_beta(curve: pd.DataFrame, cfg: PlanConfig) -> tuple[float, str]:
    """Apply the beta rule to a :func:`beta_curve`."""
    if cfg.beta_rule == "energy":
        fits = curve[curve["min_energy"] >= cfg.min_energy]
        if fits.empty:
            return float(curve["beta"].min()), (
                f"no beta keeps {cfg.min_energy:.0%} energy in every layer; using the smallest"
            )
        return float(fits["beta"].max()), (
            f"largest beta keeping >= {cfg.min_energy:.0%} spectral energy in every layer"
        )
    fits = curve[curve["trainable_share"] <= cfg.target_share]
    if fits.empty:
        return float(curve["beta"].max()), (
            f"no beta reaches a trainable share <= {cfg.target_share:.0%}; using the largest"
        )
    return float(fits["beta"].min()), (
        f"smallest beta with trainable share <= {cfg.target_share:.0%}"
    )


def _at(index: pd.DataFrame, snapshot: int | None, column: str) -> Any:
    if snapshot is None:
        return None
    value = index.loc[snapshot, column]
    return None if pd.isna(value) or (column == "step" and value < 0) else value.item()


@dataclass(frozen=True)
class Interval:
    """How far apart the delay rule's pairs are: the plan's ``interval_*`` fields.

    Attributes:
        lag: the lag as given, recorded in the plan's rules: ``5`` (snapshots), ``"5ep"``.
        snapshots: snapshots apart (for a lag in time, the median over its pairs).
        epochs: epochs apart; None where the run records no epochs.
        steps: optimizer steps apart; None where the run records no steps.
    """

    lag: int | str
    snapshots: int
    epochs: float | None
    steps: int | None

    @classmethod
    def of_snapshots(cls, lag: int, index: pd.DataFrame) -> Interval:
        """A lag in snapshots: the elapsed epochs and steps of its pairs ``(b - lag, b)``, the
        median over the pairs whose two times are known (one number for evenly spaced
        snapshots; a summary for uneven ones, which the analysis warns about)."""
        if len(index) <= lag:
            return cls(lag, lag, None, None)
        spans: list[float | None] = []
        for column in ("epoch", "step"):
            t = index[column].to_numpy(np.float64)
            a, b = t[:-lag], t[lag:]
            ok = np.isfinite(a) & np.isfinite(b) & (a >= 0) & (b >= 0)
            span = float(np.median(b[ok] - a[ok])) if ok.any() else math.nan
            # unknown (NaN, -1) or not advancing: None, as a plan.json interval must be positive
            spans.append(span if span > 0 else None)
        epochs, steps = spans
        return cls(lag, lag, epochs, None if steps is None else max(1, round(steps)))


def excluded_layers_note(excluded: dict[str, str]) -> str:
    """The note naming the recorded layers a plan leaves out because OIALR keeps them dense."""
    return (
        "beta, ranks and the expected share are over the layers OIALR factorises; kept dense "
        "(excluded): " + "; ".join(f"{n}: {r}" for n, r in excluded.items())
    )


def make_plan(
    network: pd.DataFrame,
    spectra: dict[int, dict[str, np.ndarray]],
    shapes: dict[str, tuple[int, int]],
    index: pd.DataFrame,
    lag: int | Interval,
    model_class: str,
    cfg: PlanConfig,
    kinds: dict[str, str] | None = None,
    factorize: FactorizeConfig | None = None,
    uneven_spacing: str | None = None,
) -> tuple[Plan, pd.DataFrame]:
    """Apply both rules. ``spectra[t][layer]`` gives singular values; ``index`` has epoch/step.

    ``lag`` is the lag in snapshots of the network's pairs, or the :class:`Interval` the analysis
    measured for a lag in time. ``kinds`` (layer -> registry kind, as the run file stores it;
    ``linear`` where not given) and ``factorize`` (auto mode's defaults where None) decide which
    layers OIALR will factorise (:func:`~basis_stability.lowrank.surgery.eligible_by_shape`):
    beta, the ranks and the expected share are over those; the others are named in
    ``excluded_layers``. ``uneven_spacing`` is the analysis' warning about unevenly spaced
    snapshots paired by a lag in snapshots, kept as a note.

    Returns:
        The plan and the beta curve it was chosen from (over the factorised layers).
    """
    interval = lag if isinstance(lag, Interval) else Interval.of_snapshots(lag, index)
    factorize = factorize or FactorizeConfig()
    kinds = kinds or {}
    chosen, skipped = eligible_by_shape(
        [(name, kinds.get(name, "linear"), shape) for name, shape in shapes.items()], factorize
    )
    excluded = dict(skipped)
    notes = []
    if not chosen:  # nothing to factorise: the rules over every layer rather than over none
        chosen = list(shapes)
        notes.append(
            "no recorded layer is one OIALR would factorise ("
            + "; ".join(f"{n}: {r}" for n, r in skipped)
            + "); beta and the expected share are over every recorded layer"
        )
    elif excluded:
        notes.append(excluded_layers_note(excluded))
    used = {name: shapes[name] for name in chosen}
    delay, why = choose_delay(network, cfg.share)
    at = delay if delay is not None else max(spectra)  # the latest complete spectra
    at_spectra = {name: spectra[at][name] for name in used}
    curve = beta_curve(at_spectra, used, cfg.betas)
    beta, beta_why = choose_beta(curve, cfg)
    ranks = _ranks_at(at_spectra, beta)  # the curve's own rule, so the share matches it
    share = expected_share(ranks, used)
    dense = [n for n, r in ranks.items() if not factors_pay(r, *used[n])]
    if dense:
        notes.append(
            f"at beta {beta:g} the factors of {', '.join(dense)} would not pay (k (m + n) >= "
            "m n): OIALR keeps them dense, and the expected share counts them whole"
        )
    if delay is None:
        notes.insert(0, why + f"; beta and ranks are from snapshot {at}")
    notes += excluded_notes(network)
    if uneven_spacing:
        notes.append(uneven_spacing)
    at_delay = network[network["snapshot"] == at]
    plan = Plan(
        model_class=model_class,
        layers={k: list(v) for k, v in shapes.items()},
        delay_snapshot=delay,
        delay_epoch=_at(index, delay, "epoch"),
        delay_step=_at(index, delay, "step"),
        interval_snapshots=interval.snapshots,
        interval_epochs=interval.epochs,
        interval_steps=interval.steps,
        beta=beta,
        ranks=ranks,
        expected_trainable_share=share,
        rules={
            "delay": {"tau": cfg.tau, "share": cfg.share, "lag": interval.lag, "why": why},
            "beta": {
                "rule": cfg.beta_rule,
                "min_energy": cfg.min_energy,
                "target_share": cfg.target_share,
                "why": beta_why,
            },
            "factorize": {
                "aspect_rule": factorize.aspect_rule,
                "aspect_limit": factorize.aspect_limit,
                "keep_first": factorize.keep_first,
                "keep_last": factorize.keep_last,
            },
        },
        evidence={
            "stable_share": [
                [int(b), None if pd.isna(v) else float(v)]
                for b, v in zip(network["snapshot"], network["stable_share"])
            ],
            "stable_share_at_delay": float(at_delay["stable_share"].iloc[0])
            if len(at_delay)
            else None,
            "kept_energy": {n: kept_energy(s, ranks[n]) for n, s in at_spectra.items()},
            "spectra_snapshot": at,
        },
        notes=notes,
        excluded_layers={n: r for n, r in excluded.items() if n not in ranks},
        uneven_spacing=uneven_spacing is not None,
    )
    return plan, curve


def check_plan_matches(
    plan: Plan,
    model: Any,
    fix: str = "Analyse a run of this model and pass its plan.json.",
) -> None:
    """A plan names the layers (and tall shapes) of the run it came from; they must exist in
    ``model`` (an ``nn.Module``) with the same tall shapes.

    Raises:
        ConfigError: naming ``plan``, ``model``, up to four differing layers, and ``fix``.
    """
    from .views import select_layers

    here = {v.name: list(v.shape) for v in select_layers(model).views}
    missing = [n for n in plan.layers if n not in here]
    reshaped = [n for n in plan.layers if n in here and list(plan.layers[n]) != here[n]]
    if missing or reshaped:
        detail = ", ".join(
            [f"{n} missing" for n in missing[:4]]
            + [f"{n} {plan.layers[n]} vs {here[n]}" for n in reshaped[:4]]
        )
        raise ConfigError(
            f"Expected `plan` to be a plan.json for `model` ({type(model).__name__}) but it "
            f"is for another ({plan.model_class}: {detail}). {fix}"
        )
