"""Recommend: turn an analysis' tables into an OIALR plan (delay, interval, beta, ranks).

:func:`assess` takes the :class:`~basis_stability.analysis.report.Report` that
:func:`~basis_stability.analysis.report.measure` made and adds what depends on the thresholds:
the network table (the stable share per snapshot), "stable from" per layer, the beta curve and
the :class:`Plan`. The rules themselves are pure functions in :mod:`.rules`. Plain data in,
plain data out; the OIALR trainer consumes :class:`Plan` (or its ``plan.json``).

**Delay rule.** For the "lag" pairs (a, b) (snapshots ``lag`` apart, or a given time apart: see
:mod:`basis_stability.analysis.lag`), the *stable share* at snapshot b is the parameter-weighted
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

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..analysis.lag import Interval
from ..analysis.stability import mean_stability
from ..errors import ConfigError, check_config, expected
from .eligibility import FactorizeConfig, eligible_by_shape
from .rules import (
    beta_curve,
    choose_beta,
    delay_start,
    expected_share,
    factors_pay,
    kept_energy,
    rank_at_beta,
    ranks_at,
    stable_share,
)

if TYPE_CHECKING:
    from ..analysis.report import PlanInputs, Report

PLAN_VERSION = 1
NETWORK_COLUMNS = ["snapshot", "epoch", "step", "mean_S", "weighted_S", "stable_share"]
NETWORK_COLUMNS += ["known_share", "excluded"]


@dataclass(frozen=True)
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


def choose_delay(network: pd.DataFrame, share: float) -> tuple[int | None, str]:
    """First snapshot b from which ``stable_share >= share`` holds at every later b.

    ``stable_share`` is over the layers whose S is defined (``known_share`` of the parameters,
    the rest named in ``excluded``); the reason names what was left out at the last snapshot.
    """
    if network.empty:
        return None, "no stability pairs (a run needs two snapshots)"
    first = delay_start(network["stable_share"].to_numpy(np.float64), share)
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


def _at(index: pd.DataFrame, snapshot: int | None, column: str) -> Any:
    if snapshot is None:
        return None
    value = index.loc[snapshot, column]
    return None if pd.isna(value) or (column == "step" and value < 0) else value.item()


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
    """Apply both rules; returns the plan and the beta curve it was chosen from.

    ``spectra[t][layer]`` gives singular values; ``index`` has epoch/step. ``lag`` is the lag in
    snapshots of the network's pairs, or the :class:`Interval` measured for a lag in time.
    ``kinds`` (layer -> recorded registry kind, ``linear`` where not given) and ``factorize``
    (auto mode's defaults where None) decide which layers OIALR will factorise
    (:func:`~.eligibility.eligible_by_shape`): beta, the ranks and the expected share are over
    those; the others are named in ``excluded_layers``. ``uneven_spacing`` is the analysis'
    warning about unevenly spaced snapshots paired by a lag in snapshots, kept as a note.
    """
    interval = lag if isinstance(lag, Interval) else Interval.of_snapshots(lag, index)
    factorize = factorize or FactorizeConfig()
    used, excluded, notes = _factorised(shapes, kinds or {}, factorize)
    delay, why = choose_delay(network, cfg.share)
    at = delay if delay is not None else max(spectra)  # the latest complete spectra
    at_spectra = {name: spectra[at][name] for name in used}
    curve = beta_curve(at_spectra, used, cfg.betas)
    beta, beta_why = choose_beta(curve, cfg)
    ranks = ranks_at(at_spectra, beta)  # the curve's own rule, so the share matches it
    dense = [n for n, r in ranks.items() if not factors_pay(r, *used[n])]
    if dense:
        notes.append(
            f"at beta {beta:g} the factors of {', '.join(dense)} would not pay (k (m + n) >= "
            "m n): OIALR keeps them dense, and the expected share counts them whole"
        )
    if delay is None:
        notes.insert(0, why + f"; beta and ranks are from snapshot {at}")
    notes += excluded_notes(network) + ([uneven_spacing] if uneven_spacing else [])
    energy = {n: kept_energy(v, ranks[n]) for n, v in at_spectra.items()}
    return Plan(
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
        expected_trainable_share=expected_share(ranks, used),
        rules=_rules_used(cfg, interval, why, beta_why, factorize),
        evidence=_evidence(network, at, energy),
        notes=notes,
        excluded_layers={n: r for n, r in excluded.items() if n not in ranks},
        uneven_spacing=uneven_spacing is not None,
    ), curve


def _factorised(
    shapes: dict[str, tuple[int, int]], kinds: dict[str, str], factorize: FactorizeConfig
) -> tuple[dict[str, tuple[int, int]], dict[str, str], list[str]]:
    """The layers OIALR would factorise (auto mode's eligibility, from the recorded kinds and
    tall shapes), those it keeps dense with why, and the note saying so. With none eligible,
    every layer: the rules over every layer rather than over none."""
    chosen, skipped = eligible_by_shape(
        [(name, kinds.get(name, "linear"), shape) for name, shape in shapes.items()], factorize
    )
    excluded, notes = dict(skipped), []
    if not chosen:
        chosen = list(shapes)
        notes.append(
            "no recorded layer is one OIALR would factorise ("
            + "; ".join(f"{n}: {r}" for n, r in skipped)
            + "); beta and the expected share are over every recorded layer"
        )
    elif excluded:
        notes.append(excluded_layers_note(excluded))
    return {name: shapes[name] for name in chosen}, excluded, notes


def _rules_used(
    cfg: PlanConfig, interval: Interval, why: str, beta_why: str, factorize: FactorizeConfig
) -> dict[str, Any]:
    """The plan's ``rules``: each rule's thresholds and why it decided as it did."""
    return {
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
    }


def _evidence(network: pd.DataFrame, at: int, energy: dict) -> dict[str, Any]:
    """The plan's ``evidence``: the stable share series, its value where the spectra were
    taken, and the energy each layer keeps at the chosen beta."""
    at_delay = network[network["snapshot"] == at]
    return {
        "stable_share": [
            [int(b), None if pd.isna(v) else float(v)]
            for b, v in zip(network["snapshot"], network["stable_share"])
        ],
        "stable_share_at_delay": float(at_delay["stable_share"].iloc[0]) if len(at_delay) else None,
        "kept_energy": energy,
        "spectra_snapshot": at,
    }


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
    from ..views import select_layers

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


# ------------------------------------------------------------------ from an analysis' tables
def network_table(
    stability: pd.DataFrame, shapes: dict[str, tuple[int, int]], tau: float
) -> pd.DataFrame:
    """Per snapshot b, the lag pairs over layers: mean S, parameter-weighted S and the
    :func:`~.rules.stable_share`. A layer whose S is NaN (its basis is not unique, or its
    weights are NaN/Inf) is left out of the means and the stable share (neither stable nor
    unstable) and named in ``excluded`` with its reason; ``known_share`` is the parameter share
    the stable share was measured on."""
    lagged = stability[stability["pair"] == "lag"] if len(stability) else stability
    if lagged.empty:
        return pd.DataFrame(columns=NETWORK_COLUMNS)
    size = lagged["layer"].map(lambda n: shapes[n][0] * shapes[n][1]).astype(float)
    known = lagged["S"].notna()
    frame = lagged.assign(
        size=size,
        known=known * size,
        why=np.where(known, "", lagged["layer"] + " (" + lagged["reason"].fillna("S is NaN") + ")"),
    )
    g = frame.groupby("b", sort=True)
    shares = [stable_share(d["S"].to_numpy(), d["size"].to_numpy(), tau) for _, d in g]
    weighted = [mean_stability(d["S"].to_numpy(), d["size"].to_numpy()) for _, d in g]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pd.DataFrame(
            {
                "snapshot": g.size().index,
                "epoch": g["epoch_b"].first().to_numpy(),
                "step": g["step_b"].first().to_numpy(),
                "mean_S": g["S"].mean().to_numpy(),
                "weighted_S": np.array(weighted, dtype=np.float64),
                "stable_share": np.array(shares, dtype=np.float64),
                "known_share": (g["known"].sum() / g["size"].sum()).to_numpy(),
                "excluded": g["why"].agg(lambda w: "; ".join(x for x in w if x)).to_numpy(),
            }
        )
    return out.reset_index(drop=True)


def empty_beta_curve() -> pd.DataFrame:
    return pd.DataFrame(columns=["beta", "trainable_share", "min_energy", "mean_energy"])


def plan_from(
    network: pd.DataFrame, inputs: PlanInputs, cfg: PlanConfig
) -> tuple[Plan | None, pd.DataFrame]:
    """The plan, with beta and the expected share over the layers OIALR would factorise (from
    the recorded kinds and tall shapes, auto mode's eligibility), and its beta curve; None (and
    an empty curve) without a snapshot whose full spectra are known for every layer."""
    shapes, spectra = inputs.shapes, inputs.spectra
    complete = [t for t, d in spectra.items() if len(d) == len(shapes)]
    if not complete or not sum(m * n for m, n in shapes.values()):
        return None, empty_beta_curve()
    return make_plan(
        network[network["snapshot"].isin(complete)],
        {t: spectra[t] for t in complete},
        shapes,
        inputs.index,
        inputs.interval,
        inputs.model_class,
        cfg,
        kinds=inputs.kinds,
        uneven_spacing=inputs.spacing_warning,
    )


def no_plan_note(inputs: PlanInputs) -> str:
    """Why no snapshot has the full spectrum of every layer, naming the real cause."""
    head = "no plan: it needs a snapshot whose full spectra are known for every layer"
    if inputs.approx:
        return f"{head} (the approximate SVD mode computes only the top singular values)"
    never = [n for n in inputs.shapes if not any(n in d for d in inputs.spectra.values())]
    if never:
        return f"{head}, but layer(s) {', '.join(never)} have NaN/Inf weights in every snapshot"
    return f"{head}, but every snapshot has NaN/Inf weights (or lacks a layer) somewhere"


def _rank_column(ranks: pd.DataFrame, inputs: PlanInputs, beta: float) -> list[int]:
    """r_beta per (layer, snapshot) row; -1 where the spectrum is unknown (NaN/Inf, approx)."""
    out = []
    for name, t in zip(ranks["layer"], ranks["snapshot"]):
        s = inputs.spectra[t].get(name)
        out.append(-1 if s is None else rank_at_beta(s, beta))
    return out


def _with_thresholds(summary: pd.DataFrame, report: Report, ranks: pd.DataFrame, tau: float):
    """The summary with ``stable_from_epoch`` (the delay rule on each layer's own lag S: the
    first epoch from which S stays >= tau) and the last ``rank_beta``."""
    summary = summary.copy()
    stab = report.stability
    lagged = stab[stab["pair"] == "lag"] if len(stab) else stab
    for i, name in enumerate(summary["layer"]):
        mine = lagged[lagged["layer"] == name] if len(lagged) else lagged
        if len(mine):
            first = delay_start(mine["S"].to_numpy(np.float64), tau)
            if first is not None:
                summary.loc[i, "stable_from_epoch"] = float(mine["epoch_b"].to_numpy()[first])
        last = ranks[ranks["layer"] == name].tail(1)
        if len(last) and "rank_beta" in last:
            summary.loc[i, "rank_beta"] = last["rank_beta"].iloc[0]
    return summary


def assess(report: Report, cfg: PlanConfig | None = None) -> Report:
    """Add to a measured report what the delay and beta rules decide: the network table, the
    beta curve, the plan, ``rank_beta`` per snapshot and ``stable_from_epoch`` per layer, and
    the notes that explain them.

    The network table (and so the delay) is over the layers OIALR would factorise (auto mode's
    eligibility, from the recorded kinds and shapes), the layers auto mode measures while
    training; the plan's ``excluded_layers`` names the others.

    Args:
        report: from :func:`~basis_stability.analysis.report.measure` (it carries the
            spectra and shapes the plan needs).
        cfg: the rules' thresholds (:class:`PlanConfig`).

    Returns:
        A new report; ``report`` is not changed.
    """
    check_config("plan", cfg, PlanConfig)  # bs.analyze's name for it
    cfg = cfg or PlanConfig()
    inputs = report.inputs
    if inputs is None:
        raise ConfigError(
            expected(
                "report",
                "a report made by measure() (it carries the plan's inputs)",
                type(report).__name__,
                "Pass the report basis_stability.analysis.measure() returned.",
            )
        )
    # the delay rule over the layers OIALR would factorise, as auto mode measures them
    used, _, _ = _factorised(inputs.shapes, inputs.kinds, FactorizeConfig())
    stab = report.stability
    network = network_table(stab[stab["layer"].isin(list(used))], used, cfg.tau)
    plan, curve = plan_from(network, inputs, cfg)
    notes = excluded_notes(network)
    if plan is not None and plan.excluded_layers:
        notes.append(excluded_layers_note(plan.excluded_layers))
    if plan is None:
        notes.append(no_plan_note(inputs))
    ranks = report.ranks
    if plan is not None and len(ranks):
        ranks = ranks.assign(rank_beta=_rank_column(ranks, inputs, plan.beta))
    return dataclasses.replace(
        report,
        network=network,
        ranks=ranks,
        summary=_with_thresholds(report.summary, report, ranks, cfg.tau),
        beta_curve=curve,
        plan=plan,
        notes=report.notes + notes,
    )
