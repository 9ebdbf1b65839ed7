"""The OIALR controller: full-rank, then frozen bases and a shrinking trainable S (SPEC §5).

Call :meth:`OIALR.step` after every ``optimizer.step()`` (or :meth:`OIALR.attach` it to the
optimizer)::

    oialr = OIALR(model, optimizer, OIALRConfig(delay=500, interval=100, beta=0.15))
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        oialr.step()            # True when the parameter set changed (re-wrap DDP then)

With ``auto=True`` the controller measures, every ``check_every`` steps, the stability S of each
eligible layer against the check ``lag`` checks earlier and converts when the delay rule of
:mod:`basis_stability.recommend` has held for ``patience`` checks in a row; beta comes from the
beta rule on the spectra of that moment. Every decision is logged and kept in ``events``.

:meth:`OIALRConfig.reference` is the same controller configured to follow the authors' code
(Helmholtz-AI-Energy/OIALR @ e9e885d) rank for rank: conversion before the ``delay``-th training
step with the first cut in the same call, progressive last-layers-first updates, the reference's
rounding and eligibility, and its optimizer-state handling (docs/oialr.md, "The reference preset").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _dist
from ..analysis.stability import decompose, stability
from ..errors import ConfigError, check_config, expected, positive_int
from ..lowrank.layers import LowRankFactor
from ..lowrank.optim_state import (
    check_policy,
    conversion_transform,
    swap_parameter,
    update_transform,
)
from ..lowrank.surgery import (
    FactorizeConfig,
    densify_layer_,
    eligible_layers,
    factor_of,
    factorize_layer_,
    kept_all_message,
    low_rank_layers,
)
from ..recommend import Plan, PlanConfig, beta_curve, check_plan_matches, choose_beta
from ..recommend.rules import (
    CAP_ROUNDINGS,
    check_beta,
    delay_start,
    largest_paying_rank,
    next_rank,
    rank_at_beta,
    stable_share,
    streak,
    trainable_entries,
)
from ..registry import tall_matrix
from ..views import unwrap_model

log = logging.getLogger(__name__)

PRESETS = ("bstab", "reference")
# The defaults of a training measured in epochs (``bstab train``; Python callers pass steps):
# the only place they are written. The paper trains full-rank for a sixth of training or so,
# then updates every few epochs; beta is the reference's sigma_cutoff_fraction.
BETA = 0.15  # cut-off: keep singular values >= BETA * s_1
INTERVAL_EPOCHS = 5  # nu: a rotate-and-cut update every 5 epochs
DELAY_DIVISOR = 6  # a fixed delay not given: the first 1/6 of training stays full-rank


def epoch_defaults(steps_per_epoch: int, total_steps: int) -> dict[str, int]:
    """The step counts of those defaults for one training: ``interval``, ``delay`` and auto
    mode's ``check_every`` (one epoch).

    Example:
        >>> epoch_defaults(10, 300)
        {'interval': 50, 'delay': 50, 'check_every': 10}
    """
    return {
        "interval": INTERVAL_EPOCHS * steps_per_epoch,
        "delay": total_steps // DELAY_DIVISOR,
        "check_every": steps_per_epoch,
    }


DELAY_COUNTS = ("completed", "started")
FIRST_CUTS = ("at_conversion", "one_interval_later")


@dataclass(frozen=True)
class OIALRConfig:
    """OIALR hyper-parameters, in optimizer steps.

    Attributes:
        delay: full-rank steps before conversion (ignored with ``auto``).
        interval: steps between two rotate-and-truncate updates (nu).
        beta: cut-off: keep singular values ``>= beta * s_1`` (ignored with ``auto``).
        auto: choose delay and beta from stability and spectra measured while training.
        check_every: auto: steps between two measurements (e.g. one epoch).
        lag: auto: compare each measurement with the one ``lag`` checks earlier.
        patience: auto: checks in a row the delay rule must hold.
        plan: auto: thresholds of the delay and beta rules.
        moments: optimizer-state policy: ``reset`` (default: moments zeroed, Adam's ``step``
            kept), ``restart`` (moments and ``step`` zeroed), ``slice`` or ``rotate``.
        max_cut: at most this share of k is cut per update (the reference halves at most).
        cap_rounding: the kept share ``k * (1 - max_cut)`` rounded ``ceil`` (default: 5 -> 3)
            or ``floor`` (the reference: 5 -> 2).
        min_rank_share: k never falls below ``max(1, int(min_rank_share * n))``.
        total_steps: training length, to reject a delay longer than training.
        factorize: which layers are eligible.
        delay_counts: ``completed``: convert after ``delay`` completed optimizer steps;
            ``started``: convert before the ``delay``-th training step (after ``delay - 1``
            completed ones), as the reference counts its training forwards.
        first_cut: ``at_conversion`` (default, as the reference: the first rotate-and-cut right
            at conversion, so no layer holds a full n x n S) or ``one_interval_later`` (the
            first update ``interval`` steps after conversion).
        progressive: None: every layer at every update. A share p: the reference's progressive
            schedule: each update adds ``int((L - 1) * p)`` to a count c and updates the last c
            converted layers (registration order); c = 0 means all layers (its ``[-0:]``).
        dense_when_larger: a layer whose factors would hold as many entries as W or more
            (``k (m + n) >= m n`` at the rank its cut keeps) stays dense at conversion, returns
            to dense form at an update, and is factorised at a later update once its rank pays;
            a cut stops at the largest paying rank rather than at the halving cap's. The
            reference preset has none of this (False).
        preset: the preset that built this config (``bstab`` or ``reference``), a label kept
            with the events; ``reference`` forbids ``auto``.
    """

    delay: int | None = None
    interval: int = 100
    beta: float | None = BETA
    auto: bool = False
    check_every: int = 25
    lag: int = 5
    patience: int = 2
    plan: PlanConfig = field(default_factory=PlanConfig)
    moments: str = "reset"
    max_cut: float = 0.5
    min_rank_share: float = 0.01
    total_steps: int | None = None
    factorize: FactorizeConfig = field(default_factory=FactorizeConfig)
    cap_rounding: str = "ceil"
    delay_counts: str = "completed"
    first_cut: str = "at_conversion"
    progressive: float | None = None
    dense_when_larger: bool = True
    preset: str = "bstab"

    @classmethod
    def from_plan(
        cls,
        plan: Plan | str | Path,
        steps_per_epoch: int | None = None,
        model: nn.Module | None = None,
        **overrides: Any,
    ) -> OIALRConfig:
        """The fixed schedule a plan (``bstab analyze``'s ``plan.json``) prescribes, in steps.

        The delay is the plan's ``delay_step`` and the interval its ``interval_steps``: optimizer
        steps elapsed in the recorded run, not snapshot indices. A plan that records only epochs
        is converted with ``steps_per_epoch`` (``round(epochs * steps_per_epoch)``); beta is the
        plan's. A plan whose snapshots were unevenly spaced and paired by a lag in snapshots logs
        a warning (its interval is a median over pairs that spanned different times).

        Args:
            plan: a :class:`~basis_stability.recommend.Plan` or the path of its plan.json.
            steps_per_epoch: optimizer steps per epoch of *this* training, for a plan in epochs.
            model: when given, the plan's layers (names and tall shapes) must be this model's.
            overrides: other fields (``total_steps``, ``moments``, ``factorize``...), or
                ``delay``/``interval``/``beta`` to replace the plan's; ``preset="reference"``
                builds :meth:`reference` with the plan's numbers.

        Raises:
            ConfigError: a plan with no delay (not stable yet), a time in epochs without
                ``steps_per_epoch``, an interval under one step, a plan for another ``model``.

        Example:
            >>> cfg = OIALRConfig.from_plan("plan.json", len(loader))  # doctest: +SKIP
        """
        source = plan
        if not isinstance(plan, Plan):
            plan = Plan.from_json(plan)
        where = f"the plan {source}" if isinstance(source, (str, Path)) else "the plan"
        if steps_per_epoch is not None:
            positive_int(
                "steps_per_epoch",
                steps_per_epoch,
                "Pass len(train_loader) (divided by gradient accumulation), or None.",
                wanted="a positive integer (optimizer steps per epoch)",
            )
        if model is not None:
            check_plan_matches(
                plan,
                model,
                "Analyse a run of this model and pass its plan.json, or pass the model the "
                "plan was recorded for.",
            )
        preset = overrides.pop("preset", "bstab")
        delay = overrides.pop("delay", None)
        interval = overrides.pop("interval", None)
        beta = overrides.pop("beta", plan.beta)
        if delay is None:
            delay = _plan_steps(plan, "delay", steps_per_epoch, where)
        if interval is None:
            interval = _plan_steps(plan, "interval", steps_per_epoch, where)
        _warn_uneven(plan, where, interval)
        if preset == "reference":
            return cls.reference(delay, interval, beta, **overrides)
        return cls(delay=delay, interval=interval, beta=beta, preset=preset, **overrides)

    @classmethod
    def reference(
        cls,
        delay: int,
        interval: int,
        beta: float,
        keep_first: bool = False,
        keep_last: bool = True,
        **fields: Any,
    ) -> OIALRConfig:
        """The authors' code (Helmholtz-AI-Energy/OIALR @ e9e885d), rank for rank.

        ``delay`` and ``interval`` count training steps as the reference does (its
        ``delay``/``stability_frequency``): conversion and the first cut before training step
        ``delay``, later updates every ``interval`` steps; ``beta`` is its
        ``sigma_cutoff_fraction``. Other fields (``total_steps``, ``factorize``'s
        include/exclude) may be given; ``auto`` may not (the reference has none).
        """
        if fields.get("auto"):
            raise ConfigError(
                expected(
                    "auto",
                    "False with the reference preset",
                    fields["auto"],
                    "The reference has no auto mode: give delay and beta, or use "
                    "OIALRConfig(auto=True) (bstab's preset).",
                )
            )
        base = fields.pop("factorize", None) or FactorizeConfig()
        factorize = dataclasses.replace(
            base, aspect_rule="reference", keep_first=keep_first, keep_last=keep_last
        )
        settings: dict[str, Any] = {
            "moments": "slice",
            "max_cut": 0.5,
            "cap_rounding": "floor",
            "min_rank_share": 0.01,
            "delay_counts": "started",
            "first_cut": "at_conversion",
            "progressive": 0.1,
            "dense_when_larger": False,
        }
        settings.update(fields)
        return cls(
            delay=delay,
            interval=interval,
            beta=beta,
            factorize=factorize,
            preset="reference",
            **settings,
        )

    def __post_init__(self) -> None:
        self._check_choices()
        for name in ("interval", "check_every", "lag", "patience"):
            value = positive_int(
                name, getattr(self, name), "Use e.g. one epoch's steps.",
                wanted="a positive number of steps",
            )  # fmt: skip
            object.__setattr__(self, name, value)
        if self.beta is not None:
            check_beta(self.beta)
        if self.progressive is not None and not 0 < self.progressive <= 1:
            raise ConfigError(
                expected(
                    "progressive", "None or in (0, 1]", self.progressive, "The reference uses 0.1."
                )
            )
        if not 0 < self.max_cut <= 1:
            raise ConfigError(expected("max_cut", "in (0, 1]", self.max_cut, "0.5 halves at most."))
        self._check_delay()
        check_policy(self.moments)

    def _check_choices(self) -> None:
        """The named choices, and auto mode only with bstab's preset."""
        for name, choices in (
            ("preset", PRESETS),
            ("delay_counts", DELAY_COUNTS),
            ("first_cut", FIRST_CUTS),
            ("cap_rounding", CAP_ROUNDINGS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    expected(
                        name, " or ".join(choices), getattr(self, name), f"{choices[0]} is ours."
                    )
                )
        if self.preset == "reference" and self.auto:
            raise ConfigError(
                expected(
                    "auto",
                    "False with preset='reference'",
                    self.auto,
                    "The reference has no auto mode: give delay and beta, or use bstab's preset.",
                )
            )

    def _check_delay(self) -> None:
        """A fixed schedule needs a delay and a beta; the delay is >= 0 (>= 1 counted as the
        reference counts) and shorter than training."""
        if self.delay_counts == "started" and not self.auto and (self.delay or 0) < 1:
            raise ConfigError(
                expected(
                    "delay",
                    ">= 1 step with delay_counts='started'",
                    self.delay,
                    "Use 1 to convert before the first step (the reference with delay 0 "
                    "converts but never updates).",
                )
            )
        if not self.auto and (self.delay is None or self.beta is None):
            raise ConfigError(
                "Expected `delay` and `beta` when `auto=False` but got "
                f"delay={self.delay!r}, beta={self.beta!r}. Give both, or `auto=True`.",
                argument=("delay", "beta", "auto"),
            )
        if self.delay is not None and self.delay < 0:
            raise ConfigError(expected("delay", ">= 0 steps", self.delay, "Use 0 to convert now."))
        if (
            self.total_steps is not None
            and self.delay is not None
            and not self.auto
            and self.delay - (self.delay_counts == "started") >= self.total_steps
        ):
            raise ConfigError(
                expected(
                    "delay",
                    f"shorter than training ({self.total_steps} steps)",
                    self.delay,
                    "Lower `delay` or train longer.",
                )
            )


def _warn_uneven(plan: Plan, where: str, interval: int) -> None:
    """A plan measured on unevenly spaced snapshots paired by a lag in snapshots: its interval
    is a median over pairs that spanned different times; say so."""
    if plan.uneven_spacing and isinstance(plan.rules.get("delay", {}).get("lag"), int):
        log.warning(
            "%s was measured on unevenly spaced snapshots with a lag in snapshots, so its "
            "interval (%s steps) summarises pairs that spanned different times; analyse the run "
            "again with a lag in time (e.g. lag='5ep' or '200steps') for an interval that means "
            "one elapsed time",
            where[0].upper() + where[1:],
            interval,
        )


def _plan_steps(plan: Plan, what: str, steps_per_epoch: int | None, where: str) -> int:
    """A plan's ``delay`` or ``interval`` in optimizer steps: its steps, else its epochs times
    ``steps_per_epoch`` (see :meth:`OIALRConfig.from_plan`)."""
    if what == "delay":
        steps, epochs, field_name = plan.delay_step, plan.delay_epoch, "delay_epoch"
        if plan.delay_snapshot is None and steps is None and epochs is None:
            raise ConfigError(
                f"Expected a plan with a delay but {where} has delay_snapshot=None: its run was "
                "not stable yet ("
                + str(plan.rules.get("delay", {}).get("why", "no delay"))
                + "). Train the recorded run longer and analyse it again, pass `delay=...`, or "
                "use auto mode (`auto=True`).",
                argument=("delay", "auto"),
            )
    else:
        steps, epochs, field_name = plan.interval_steps, plan.interval_epochs, "interval_epochs"
    if steps is not None:
        return steps
    if epochs is None:
        snapshots = plan.delay_snapshot if what == "delay" else plan.interval_snapshots
        raise ConfigError(
            f"Expected the plan's {what} in steps or epochs but {where} has only "
            f"{what}_snapshot{'s' if what == 'interval' else ''}={snapshots} (its run recorded "
            f"neither steps nor epochs there, or was too short for the lag). Pass `{what}=...` "
            "in optimizer steps, or record the run with steps and analyse it again.",
            argument=what,
        )
    if steps_per_epoch is None:
        raise ConfigError(
            expected(
                "steps_per_epoch",
                f"an integer to convert the plan's {field_name}={epochs:g} into steps",
                None,
                f"{where[0].upper() + where[1:]} records its {what} only in epochs: pass "
                "steps_per_epoch=len(train_loader), or "
                f"{what}=... in optimizer steps.",
            )
        )
    converted = round(epochs * steps_per_epoch)
    if what == "interval" and converted < 1:
        raise ConfigError(
            expected(
                field_name,
                f"at least one step ({1 / steps_per_epoch:.3g} epochs at steps_per_epoch="
                f"{steps_per_epoch})",
                epochs,
                "Pass `interval=...` in steps, or analyse the run again with a larger `lag`.",
            ),
            argument="interval",
        )
    return converted


class OIALR:
    """Drives OIALR on ``model`` trained by ``optimizer`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: OIALRConfig | None = None,
        filter_fn=None,
    ) -> None:
        check_config("config", config, OIALRConfig)
        self.cfg = config or OIALRConfig(auto=True)
        self.model, self.optimizer = unwrap_model(model), optimizer
        self.filter_fn = filter_fn
        self._check_optimizer()
        self.candidates, self.skipped = eligible_layers(self.model, self.cfg.factorize, filter_fn)
        if not self.candidates and not low_rank_layers(self.model):
            kept_all = kept_all_message(self.model, self.skipped)
            if kept_all:
                raise ConfigError(kept_all)
            why = "; ".join(f"{n}: {r}" for n, r in self.skipped[:10]) or "none"
            raise ConfigError(
                f"Expected a model with layers OIALR can factorise but "
                f"{type(self.model).__name__} has none ({why}). Relax the "
                "eligibility options (aspect_limit, keep_first, keep_last)."
            )
        self.steps = 0
        self.converted_at: int | None = None
        self.beta = self.cfg.beta
        self.events: list[dict[str, Any]] = []
        # called with every decision record, e.g. Recorder.log_event to keep it in the run file
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.layers: dict[str, nn.Module] = {}  # low-rank now
        self.dense: dict[str, nn.Module] = {}  # eligible, dense because factors would not pay
        self._order: list[str] = []  # every layer conversion considered, registration order
        self._history: dict[str, deque] = {}
        self._shares: list[float] = []  # the stable share at each auto-mode check
        self._optimizer_steps = 0
        self._warned = False
        self._auto_hook = None
        self._count_hook = optimizer.register_step_post_hook(self._count)
        self._progress = 0  # the progressive schedule's count of layers to update
        self.full_rank_trainable = self.trainable_params()
        if (
            not self.cfg.auto
            and self.cfg.delay_counts == "started"
            and self._conversion_step() <= 0
            and not low_rank_layers(self.model)  # a resumed low-rank model: load_state follows
        ):
            self._convert_and_cut()  # delay 1 as the reference counts: before the first step

    # ------------------------------------------------------------------ checks
    def _check_optimizer(self) -> None:
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise ConfigError(
                f"Expected the optimizer to hold the model's parameters but it "
                f"lacks {len(missing)} of them ({', '.join(missing[:5])}). Pass the "
                "optimizer built from this model's parameters."
            )

    def _count(self, *_: Any) -> None:
        self._optimizer_steps += 1
        grace = (self.cfg.delay or 0) + self.cfg.interval
        if not self._warned and self.steps == 0 and self._optimizer_steps > grace:
            self._warned = True
            msg = (
                f"OIALR.step() was never called in {self._optimizer_steps} optimizer steps: "
                "nothing is being factorised. Call oialr.step() after optimizer.step(), or "
                "oialr.attach()."
            )
            log.error(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def attach(self) -> OIALR:
        """Call :meth:`step` automatically after every ``optimizer.step()``."""
        if self._auto_hook is None:
            self._auto_hook = self.optimizer.register_step_post_hook(lambda *_: self.step())
        return self

    # ------------------------------------------------------------------ the schedule
    @property
    def phase(self) -> str:
        return "full" if self.converted_at is None else "low-rank"

    def step(self) -> bool:
        """Advance one optimizer step; convert or update when due.

        Returns:
            True when the model's parameter set changed (conversion or a rank cut): a DDP
            wrapper must then be rebuilt around the model.
        """
        self.steps += 1
        if self.converted_at is None:
            if self.cfg.auto:
                if self.steps % self.cfg.check_every == 0 and self._delay_rule_fires():
                    return self._convert_and_cut()
            elif self.steps >= self._conversion_step():
                return self._convert_and_cut()
            return False
        if (self.steps - self.converted_at) % self.cfg.interval == 0:
            return self.update()
        return False

    def _conversion_step(self) -> int:
        """The completed-step count at which a fixed delay converts."""
        return self.cfg.delay - (self.cfg.delay_counts == "started")

    def _convert_and_cut(self) -> bool:
        changed = self.convert()
        if changed and self.cfg.first_cut == "at_conversion":
            self.update(_recheck_dense=False)  # conversion just decided them on this same W
        return changed

    def _log(self, event: str, **numbers: Any) -> None:
        record = {"step": self.steps, "event": event, **numbers}
        self.events.append(record)
        log.info("OIALR %s at step %d: %s", event, self.steps, numbers)
        if self.on_event is not None:
            self.on_event(record)

    # ------------------------------------------------------------------ auto mode
    def _delay_rule_fires(self) -> bool:
        """One auto-mode check: measure, decide by the delay rule and, when it fires, by the
        beta rule (both :mod:`basis_stability.recommend.rules`), log each decision."""
        measured = self._measure()
        if measured is None:  # not lag + 1 checks yet
            return False
        values, spectra, shapes, reasons = measured
        plan = self.cfg.plan
        names = list(values)
        sizes = [shapes[n][0] * shapes[n][1] for n in names]
        share = stable_share([values[n] for n in names], sizes, plan.tau)
        self._shares.append(share)
        fires = delay_start(self._shares, plan.share, self.cfg.patience) is not None
        self._log("check", **self._check_numbers(share, values, reasons))
        if not fires:
            return False
        self.beta, why = choose_beta(beta_curve(spectra, shapes, plan.betas), plan)
        self._log("auto-decision", stable_share=share, beta=self.beta, why=why)
        return True

    def _check_numbers(
        self, share: float, values: dict[str, float], reasons: dict[str, str]
    ) -> dict[str, Any]:
        """The numbers a check logs: the share, the streak, the mean S and what was excluded."""
        known = [v for v in values.values() if not math.isnan(v)]
        numbers = {"stable_share": share, "streak": streak(self._shares, self.cfg.plan.share)}
        numbers["mean_S"] = float(np.mean(known)) if known else math.nan
        if reasons:  # excluded from the share, named, never counted as unstable
            shown = sorted(reasons)[:8]  # an event row holds 4 KiB
            numbers["excluded"] = {name: reasons[name][:80] for name in shown}
            numbers["excluded_count"] = len(reasons)
        return numbers

    @torch.no_grad()
    def _measure(self):
        """Measure: each candidate's decomposition now, and its S against ``lag`` checks ago.

        Returns ``(S by layer, singular values, tall shapes, reasons S is NaN)``, or None while
        some layer has fewer than ``lag + 1`` checks.
        """
        lag = self.cfg.lag
        spectra, values, shapes, reasons = {}, {}, {}, {}
        for name, module in self.candidates:
            w = tall_matrix(module).detach().float().cpu()
            now = decompose(w)  # the analysis' own S: NaN where the basis is not unique
            hist = self._history.setdefault(name, deque(maxlen=lag + 1))
            hist.append(now)
            spectra[name] = now.svd.S.double().numpy()
            shapes[name] = tuple(w.shape)
            if len(hist) > lag:
                measure = stability(hist[0], now)
                values[name] = measure.value
                if math.isnan(measure.value):
                    reasons[name] = measure.reason or "S is NaN"
        if len(values) < len(self.candidates):
            return None
        return values, spectra, shapes, reasons

    # ------------------------------------------------------------------ conversion
    def _rank_rule(self, k: int, s: torch.Tensor, shape: tuple[int, int]) -> int | None:
        """The rank rule (:func:`~basis_stability.recommend.rules.next_rank`) with this config."""
        cfg = self.cfg
        return next_rank(
            k,
            s.tolist(),
            self.beta,
            *shape,
            max_cut=cfg.max_cut,
            cap_rounding=cfg.cap_rounding,
            min_rank_share=cfg.min_rank_share,
            dense_when_larger=cfg.dense_when_larger,
        )

    @torch.no_grad()
    def _dense_rank(self, module: nn.Module) -> tuple[int | None, tuple[int, int]] | None:
        """The rank rule on a dense layer's W (k = n); None when W is not finite."""
        w = tall_matrix(module).detach().double().cpu()
        if not torch.isfinite(w).all():
            return None
        s = torch.linalg.svdvals(w)
        shape = (int(w.shape[0]), int(w.shape[1]))
        return self._rank_rule(shape[1], s, shape), shape

    def convert(self) -> bool:
        """Factorise every eligible layer now (exactly: the outputs do not change).

        With ``dense_when_larger`` (bstab's preset), a layer whose rank after its first cut
        would not pay (``k (m + n) >= m n``) stays dense; every update checks it again.
        """
        if self.converted_at is not None:
            return False
        chosen, _ = eligible_layers(self.model, self.cfg.factorize, self.filter_fn)
        self._order = [name for name, _ in chosen]
        dense = {}
        if self.cfg.dense_when_larger:
            for name, module in chosen:
                decided = self._dense_rank(module)
                if decided is not None and decided[0] is None:
                    dense[name] = module
        # attention first: its out_proj Linear is converted after it, inside the new module
        for name in sorted((n for n in self._order if n not in dense), key=lambda n: n.count(".")):
            self._factorize(name)
        present = low_rank_layers(self.model)
        self.layers = {n: present[n] for n in self._order if n in present}
        self.dense = {n: self.model.get_submodule(n) for n in self._order if n in dense}
        self.converted_at = self.steps
        self._history.clear()
        self._broadcast()
        numbers: dict[str, Any] = {"beta": self.beta, "layers": len(self.layers)}
        if self.dense:
            numbers["dense"] = list(self.dense)[:8]  # an event row holds 4 KiB
            numbers["dense_count"] = len(self.dense)
        self._log("convert", **numbers, trainable_share=self.trainable_share())
        return True

    def _factorize(self, name: str) -> LowRankFactor:
        """Act: factorise one layer and give its S the dense weight's optimizer slot."""
        old_weight, module = factorize_layer_(self.model, name)
        factor = factor_of(module)
        self._swap(old_weight, factor.S, conversion_transform(self.cfg.moments, factor))
        return factor

    def _densify(self, name: str) -> None:
        """Act: one low-rank layer back to dense; its new W starts with zeroed moments."""
        old, weight = densify_layer_(self.model, name)
        self._swap(old, weight, lambda _key, t: torch.zeros_like(weight))

    def _cut(self, factor: LowRankFactor, k_new: int, svd: tuple | None = None) -> None:
        """Act: rotate one factor so S is diagonal and keep ``k_new`` values."""
        old = factor.S
        rot = factor.rotate_and_truncate_(k_new, svd)
        self._swap(old, factor.S, update_transform(self.cfg.moments, rot))

    def _swap(self, old: nn.Parameter, new: nn.Parameter, transform) -> None:
        """Act: ``new`` takes ``old``'s optimizer slot, its state mapped by the moment policy."""
        restart = self.cfg.moments == "restart"
        swap_parameter(self.optimizer, old, new, transform, restart=restart)

    def _due_layers(self) -> list[str]:
        """The layers this update touches: all, or the progressive schedule's last ones."""
        names = list(self._order)
        if self.cfg.progressive is None:
            return names
        self._progress += int((len(names) - 1) * self.cfg.progressive)
        return names[-self._progress :]  # [-0:] is every layer, as in the reference

    @torch.no_grad()
    def update(self, _recheck_dense: bool = True) -> bool:
        """Rotate each due low-rank layer so S is diagonal, then cut values below beta * s_1.

        With ``dense_when_larger``, a low-rank layer whose new rank would not pay returns to
        dense form, and a dense layer whose rank now pays is factorised and cut. Layer by layer:
        measure its spectrum, decide by the rank rule (:func:`~.rules.next_rank`), act.
        """
        done: list[tuple[str, str, int | None]] = []
        for name in self._due_layers():
            decision = self._decide(name, _recheck_dense)
            if decision is not None:
                done.append((name, *self._act(name, *decision)))
        present = low_rank_layers(self.model)
        self.layers = {n: present[n] for n in self._order if n in present}
        for name, action, _ in done:
            if action == "densify":
                self.dense[name] = self.model.get_submodule(name)
        self.dense = {n: self.dense[n] for n in self._order if n in self.dense}
        self._broadcast()
        self._log_update(done)
        return any(action != "skip-nan" for _, action, _ in done)

    def _decide(self, name: str, recheck_dense: bool) -> tuple[str, int | None, Any] | None:
        """Measure one due layer and decide: ``(action, rank, svd)`` with action "factorise"
        (a dense layer whose rank now pays), "cut", "densify" or "skip-nan"; None: leave it."""
        if name in self.dense:
            if not recheck_dense:
                return None
            decided = self._dense_rank(self.dense[name])
            if decided is None or decided[0] is None:
                return None
            return "factorise", decided[0], None
        factor = factor_of(self.layers[name])
        # check S itself: torch.linalg.svd raises on non-finite input
        finite = bool(torch.isfinite(factor.S).all())
        svd = torch.linalg.svd(factor.S.detach().double()) if finite else None
        if svd is None or not torch.isfinite(svd[1]).all():
            return "skip-nan", None, None
        k_new = self._rank_rule(factor.rank, svd[1], factor.tall_shape)
        return ("densify", None, None) if k_new is None else ("cut", k_new, svd)

    def _act(self, name: str, action: str, rank: int | None, svd: Any) -> tuple[str, int | None]:
        """Carry out one decision on the model and the optimizer; returns (action, new rank)."""
        if action == "skip-nan":
            warnings.warn(
                f"NaN/Inf in S of {name}: its update is skipped (U and V kept).",
                RuntimeWarning,
                stacklevel=3,
            )
            self._log("skip-nan", layer=name)
        elif action == "densify":
            self._densify(name)
        elif action == "factorise":
            del self.dense[name]
            factor = self._factorize(name)
            if rank < factor.rank:
                self._cut(factor, rank)
            rank = factor.rank
        else:
            self._cut(factor_of(self.layers[name]), rank, svd)
        return action, rank

    def _log_update(self, done: list[tuple[str, str, int | None]]) -> None:
        ranks = {name: k for name, action, k in done if action in ("cut", "factorise")}
        numbers: dict[str, Any] = {"ranks": ranks}
        densified = [name for name, action, _ in done if action == "densify"]
        factorised = [name for name, action, _ in done if action == "factorise"]
        if densified:
            numbers["densified"] = densified[:8]
        if factorised:
            numbers["factorised"] = factorised[:8]
        self._log("update", **numbers, trainable_share=self.trainable_share())

    def _broadcast(self) -> None:
        """Under torch.distributed, every rank takes rank 0's factors (identical everywhere)."""
        import torch.distributed as dist

        if _dist.world_size() < 2:
            return
        for module in self.layers.values():
            factor = factor_of(module)
            for tensor in (factor.U, factor.S.data, factor.Vh):
                dist.broadcast(tensor, src=0)

    # ------------------------------------------------------------------ reporting
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def trainable_share(self) -> float:
        """Trainable parameters now / trainable parameters of the full-rank model (SPEC §5.6)."""
        return self.trainable_params() / self.full_rank_trainable

    def factorised_share(self) -> float:
        """Trainable share within the layers OIALR factorises: sum k^2 / sum m n, a layer kept
        dense (``dense_when_larger``) counting all its m n entries (1.0 before conversion)."""
        if not self.layers:
            return 1.0
        trainable = total = 0
        for module in self.layers.values():
            (m, n), k = factor_of(module).tall_shape, factor_of(module).rank
            trainable, total = trainable + trainable_entries(k, m, n), total + m * n
        for module in self.dense.values():
            m, n = tall_matrix(module).shape
            trainable, total = trainable + m * n, total + m * n
        return trainable / total

    @torch.no_grad()
    def dense_summary(self) -> str | None:
        """One line naming the eligible layers kept dense because their factors would not pay
        (with the beta rank now against the largest paying rank); None when there are none.

        Example:
            >>> oialr.dense_summary()  # doctest: +SKIP
            'OIALR kept 1 of 2 eligible layers dense: its factors would not be smaller than W ...'
        """
        if not self.dense:
            return None
        parts = []
        for name, module in list(self.dense.items())[:6]:
            w = tall_matrix(module).detach().double().cpu()
            m, n = (int(d) for d in w.shape)
            s = torch.linalg.svdvals(w).tolist() if torch.isfinite(w).all() else []
            keep = rank_at_beta(s, self.beta) if s else "?"
            parts.append(
                f"{name} ({m}x{n}: beta rank {keep} > {largest_paying_rank(m, n)}, "
                "the largest paying)"
            )
        more = f" and {len(self.dense) - 6} more" if len(self.dense) > 6 else ""
        total = len(self.dense) + len(self.layers)
        return (
            f"OIALR kept {len(self.dense)} of {total} eligible layers dense, as their factors "
            f"at beta {self.beta:g} would hold as many entries as W or more (k (m + n) >= m n): "
            f"{', '.join(parts)}{more}; they are checked again at every update. A larger beta "
            "cuts deeper, or OIALRConfig(dense_when_larger=False) factorises them anyway."
        )

    def dense_layers(self) -> list[str]:
        """The eligible layers kept dense after conversion because their factors would not pay
        (``k (m + n) >= m n``, ``dense_when_larger``), in registration order."""
        return list(self.dense)

    def ranks(self) -> dict[str, int]:
        """``{layer name: k}`` of the converted layers, in registration order ({} before)."""
        return {n: factor_of(m).rank for n, m in self.layers.items()}

    def never_converted(self) -> dict[str, Any] | None:
        """Auto mode's numbers while it has not converted; None after conversion or when not auto.

        Always ``steps``, ``checks`` (stability checks logged) and the rule (``tau``,
        ``needed_share``, ``patience``, ``lag``, ``check_every``). After a check: the last one's
        ``stable_share``, ``streak`` and ``mean_S``, and the ``best_share`` seen. Before any
        (training shorter than ``lag + 1`` checks): ``first_check_step``, the steps it needs.
        """
        cfg = self.cfg
        if not cfg.auto or self.converted_at is not None:
            return None
        checks = [e for e in self.events if e["event"] == "check"]
        numbers: dict[str, Any] = {
            "steps": self.steps,
            "checks": len(checks),
            "tau": cfg.plan.tau,
            "needed_share": cfg.plan.share,
            "patience": cfg.patience,
            "lag": cfg.lag,
            "check_every": cfg.check_every,
        }
        if not checks:
            numbers["first_check_step"] = cfg.check_every * (cfg.lag + 1)
            return numbers
        last = checks[-1]
        numbers.update(
            stable_share=last["stable_share"],
            best_share=max(
                (e["stable_share"] for e in checks if not math.isnan(e["stable_share"])),
                default=math.nan,
            ),
            streak=last["streak"],
            mean_S=last["mean_S"],
        )
        return numbers

    def never_converted_summary(self, fix: str | None = None) -> str | None:
        """One line on an auto run that has not converted (None otherwise, see
        :meth:`never_converted`): its last and best stable share and what the rule needs.

        ``fix`` replaces the closing advice (e.g. with command-line option names).

        Example:
            >>> oialr.never_converted_summary()  # doctest: +SKIP
            'OIALR auto mode never converted in 240 steps: last stable share 0.62 (best 0.70, ...'
        """
        n = self.never_converted()
        if n is None:
            return None
        head = f"OIALR auto mode never converted in {n['steps']} steps: "
        every, lag = n["check_every"], n["lag"]
        if n["checks"] == 0:
            least = every * (lag + n["patience"])
            fix = fix or "train longer, lower lag or check_every, or give delay and beta"
            return head + (
                f"no stability check ran (the first needs {n['first_check_step']} steps, lag "
                f"{lag} + 1 checks of {every} steps; converting needs at least {least} steps); "
                f"{fix}"
            )
        fix = fix or "train longer, lower tau or share (PlanConfig), or give delay and beta"
        return head + (
            f"last stable share {n['stable_share']:.2f} (best {n['best_share']:.2f}, mean S "
            f"{n['mean_S']:.3f}, streak {n['streak']}) after {n['checks']} checks; it needs "
            f"{n['needed_share']:.2f} for {n['patience']} checks in a row at "
            f"S >= {n['tau']:g} (lag {lag} checks of {every} steps); {fix}"
        )

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this controller (JSON-able).

        The auto mode's stability history (bases of recent checks) is not kept: a run resumed
        before conversion measures afresh, so its delay rule needs ``lag + patience`` new checks.
        """
        return {
            "steps": self.steps,
            "converted_at": self.converted_at,
            "beta": self.beta,
            "ranks": self.ranks() if self.converted_at is not None else {},
            "full_rank_trainable": self.full_rank_trainable,
            "optimizer_steps": self._optimizer_steps,
            "progress": self._progress,
            "dense": self.dense_layers(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`; the model must already hold the checkpoint's low-rank
        layers (as rebuilt by the framework integrations) when it was taken after conversion."""
        self.steps = int(state["steps"])
        self._optimizer_steps = int(state.get("optimizer_steps", self.steps))
        self._progress = int(state.get("progress", 0))
        self.converted_at = state.get("converted_at")
        self.beta = state.get("beta", self.beta)
        self.full_rank_trainable = int(state.get("full_rank_trainable", self.full_rank_trainable))
        if self.converted_at is not None:
            present = low_rank_layers(self.model)
            ranks = state.get("ranks", {})
            wrong = {
                n: k
                for n, k in ranks.items()
                if n not in present or factor_of(present[n]).rank != k
            }
            if wrong:
                raise ConfigError(
                    f"Expected the model to hold the checkpoint's low-rank layers {wrong} but it "
                    "does not. Rebuild them first (the Lightning and Hugging Face integrations do "
                    "this when resuming), or resume with the same model."
                )
            dense = list(state.get("dense", []))
            order = [n for n, _ in self.model.named_modules() if n in ranks or n in dense]
            self._order = order
            self.layers = {n: present[n] for n in order if n in ranks}
            self.dense = {n: self.model.get_submodule(n) for n in order if n in dense}

    def close(self) -> None:
        for hook in (self._count_hook, self._auto_hook):
            if hook is not None:
                hook.remove()
