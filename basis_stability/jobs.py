"""Recipes behind ``bstab record`` and ``bstab train``: a built-in model and dataset wired to the
stages (recording, training, OIALR, export). No rule or default lives here: the defaults are the
configs' own (:mod:`basis_stability.training.oialr` names the ones counted in epochs)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .devices import resolve_device
from .errors import (
    ConfigError,
    Message,
    RunExistsError,
    RunFileError,
    RunLockedError,
    expected,
)
from .recording import RecordConfig, Recorder, every_epoch, parse_schedule
from .store.paths import refuse_existing
from .training.loop import HEADLINE, TrainConfig, fit, make_optimizer
from .zoo import build_model, check_pair, load_dataset


@dataclass(frozen=True, kw_only=True)
class RecordJob:
    """A built-in training run with recording (what ``bstab record`` runs)."""

    model: str = "cnn"
    dataset: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    schedule: str = "epoch"
    device: str = "cpu"


def headline(history: list[dict[str, float]], task: str = "classification", unit: str = "") -> str:
    """The last epoch's headline metric as text: ``val_acc 0.975`` or ``val_mse 0.00217 ...``.

    A regression's MSE is in the dataset's target units (standardised for co2); with ``unit``
    the validation RMSE in the original units follows, e.g. ``(standardised; RMSE 0.60 ppm)``.

    Example:
        >>> headline([{"val_acc": 0.975}])
        'val_acc 0.9750'
    """
    name = HEADLINE[task]
    last = history[-1]
    if name == "val_acc":
        return f"val_acc {last[name]:.4f}"
    text = f"val_mse {last[name]:.4g}"
    if unit and "val_rmse_orig" in last:
        text += f" (standardised; RMSE {last['val_rmse_orig']:.3g} {unit})"
    return text


class _Headline:
    """The headline metric of a job result with ``history``, ``task`` and ``unit``."""

    history: list[dict[str, float]]
    task: str
    unit: str

    @property
    def metric(self) -> tuple[str, float]:
        """``(name, value)`` of the headline metric: ``val_acc`` or ``val_mse``, last epoch."""
        name = HEADLINE[self.task]
        return name, self.history[-1][name]

    def summary(self) -> str:
        """The headline metric as text, see :func:`headline`."""
        return headline(self.history, self.task, self.unit)


@dataclass
class RecordResult(_Headline):
    """What :func:`run_record_job` did. ``task`` and ``unit`` come from the dataset."""

    path: Path
    history: list[dict[str, float]]
    n_snapshots: int
    n_layers: int
    task: str = "classification"
    unit: str = ""


T = TypeVar("T")


def default_run_path(
    stem: str, folder: str | Path = "runs", taken: frozenset = frozenset()
) -> Path:
    """``runs/{stem}.h5``, or ``{stem}-2.h5``, ``-3``, ... so no existing run is overwritten.

    ``taken`` adds names to skip although no file holds them yet (another process is creating
    them). Only a guess: use :func:`at_free_path` to create the run under the name.
    """
    folder = Path(folder)
    path = folder / f"{stem}.h5"
    i = 2
    while path.exists() or path in taken:
        path = folder / f"{stem}-{i}.h5"
        i += 1
    return path


def at_free_path(stem: str, create: Callable[[Path], T], folder: str | Path = "runs") -> T:
    """``create(path)`` at the first free :func:`default_run_path`, taking the next on a race.

    ``create`` must make the run with ``mode="create"``, which is atomic: when another process
    takes the name between the check and the creation, it raises :class:`RunExistsError` (the
    file appeared) or :class:`RunLockedError` (its creator holds the run's lock); both come
    before any training, and the next free name is tried.

    Example:
        >>> at_free_path("cnn-digits-seed0", lambda p: run_record_job(job, p))  # doctest: +SKIP
    """
    taken: set[Path] = set()
    for _ in range(1000):
        path = default_run_path(stem, folder, frozenset(taken))
        try:
            return create(path)
        except (RunExistsError, RunLockedError):
            taken.add(path)  # another process got there first
    raise RunFileError(
        f"Cannot find a free run name {Path(folder) / stem}-N.h5: 1000 names in a row were "
        "taken while being tried. Pass an explicit `path`.",
        argument="path",
    )


def build(job: RecordJob) -> tuple[torch.nn.Module, object]:
    """The job's dataset and freshly initialised model.

    Raises:
        ConfigError: a model of one task on a dataset of another (``forecaster`` on digits,
            ``mlp`` on co2), before anything is loaded.
    """
    check_pair(job.model, job.dataset)
    data = load_dataset(job.dataset, seed=job.train.seed)
    torch.manual_seed(job.train.seed)
    model = build_model(job.model, data.input_shape, data.num_classes, seed=job.train.seed)
    return model.to(resolve_device(job.device)), data


def run_record_job(
    job: RecordJob, path: str | Path, mode: str = "create", progress: bool = True
) -> RecordResult:
    """Train a built-in model and record it into ``path``."""
    model, data = build(job)
    steps_per_epoch = math.ceil(len(data.x_train) / job.train.batch_size)
    schedule = parse_schedule(job.schedule, steps_per_epoch, steps_per_epoch * job.train.epochs)
    meta = {
        **job.record.metadata,
        "job": {
            "model": job.model,
            "dataset": job.dataset,
            "task": data.task,
            "schedule": job.schedule,
            "device": job.device,
            "steps_per_epoch": steps_per_epoch,
            "train": asdict(job.train),
        },
    }
    record_cfg = RecordConfig(**{**asdict(job.record), "metadata": meta})
    optimizer = make_optimizer(model, job.train)
    with Recorder(model, path, record_cfg, mode=mode) as rec:
        by_epoch = isinstance(schedule, every_epoch)
        if by_epoch:

            def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
                rec.snapshot(epoch=epoch, step=epoch * steps_per_epoch, metrics=metrics)

            on_loss = None
        else:
            # the loss of the step that fires the snapshot, taken by the snapshot itself, so
            # no loss of a later step is left pending (and dropped with a warning) at close
            last: dict[str, float] = {}
            rec.attach(
                optimizer, schedule, metrics_fn=lambda: dict(last), steps_per_epoch=steps_per_epoch
            )
            on_epoch_end = None

            def on_loss(loss: float) -> None:
                last["batch_loss"] = loss

        history = fit(
            model,
            data,
            job.train,
            optimizer=optimizer,
            on_epoch_end=on_epoch_end,
            on_loss=on_loss,
            progress=progress,
        )
        return RecordResult(
            Path(path), history, rec.n_snapshots, len(rec.views), data.task, data.unit
        )


# ---------------------------------------------------------------------------- OIALR training
@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """A built-in training run, full-rank or OIALR (what ``bstab train`` runs).

    ``delay`` and ``interval`` are epochs (``"10"``, ``"2.5"``) or steps (``"250steps"``).
    ``auto`` None (default): with none of ``delay``, ``beta`` and ``plan`` given, OIALR runs in
    auto mode (``bstab`` preset) or with delay = training/6 and beta = 0.15 (``reference``
    preset, which has no auto mode). ``auto=False`` never runs auto mode: with the ``bstab``
    preset it needs ``delay``, ``beta`` or ``plan``. ``auto=True`` takes none of them.
    ``preset="reference"`` is :meth:`OIALRConfig.reference`; ``moments``, ``keep_first``
    and ``keep_last`` left None take the preset's (``reset``, False, False for ``bstab``;
    ``slice``, False, True for ``reference``). ``target_share`` (auto mode only) picks beta by
    the share rule: the smallest beta whose expected trainable share of the factorised layers
    (layers kept dense counted whole) is at most this; None keeps the energy rule.
    ``overrides`` sets further :class:`~basis_stability.training.oialr.OIALRConfig` fields on top
    (Python only; e.g.
    ``{"first_cut": "at_conversion", "progressive": 0.1}``), checked as the config checks them.
    """

    model: str = "cnn"
    dataset: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "oialr"
    delay: str | None = None
    interval: str | None = None
    beta: float | None = None
    plan: str | None = None
    moments: str | None = None
    device: str = "cpu"
    preset: str = "bstab"
    keep_first: bool | None = None
    keep_last: bool | None = None
    auto: bool | None = None
    overrides: dict[str, Any] | None = None
    target_share: float | None = None


@dataclass
class TrainResult(_Headline):
    """What :func:`run_train_job` did. ``task`` and ``unit`` come from the dataset;
    ``never_converted`` is the line of an auto run that ended full-rank (see
    :meth:`~basis_stability.training.oialr.OIALR.never_converted_summary`), else None;
    ``kept_dense`` the line naming layers kept dense because their factors would not pay
    (:meth:`~basis_stability.training.oialr.OIALR.dense_summary`), else None; ``ranks`` and
    ``dense_layers`` the controller's at the end ({} and [] for full-rank training)."""

    run_path: Path
    export_path: Path | None
    history: list[dict[str, float]]
    seconds: float
    trainable_share: float
    factorised_share: float
    events: list[dict]
    export: object | None = None
    task: str = "classification"
    unit: str = ""
    never_converted: str | None = None
    kept_dense: str | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    dense_layers: list[str] = field(default_factory=list)


def parse_steps(text: str | None, arg: str, steps_per_epoch: int) -> int | None:
    """``"10"`` epochs or ``"250steps"`` -> optimizer steps.

    Raises:
        ConfigError: not a number, or not a finite, non-negative one (``inf``, ``nan``, ``-3``,
            ``1e400``, which overflows to inf).

    Example:
        >>> parse_steps("2.5", "delay", 10), parse_steps("7steps", "delay", 10)
        (25, 7)
    """
    if text is None:
        return None
    raw = str(text).strip().lower()
    wanted = "epochs (e.g. 10) or steps (e.g. 250steps)"
    try:
        if raw.endswith("step") or raw.endswith("steps"):
            value = float(int(raw.removesuffix("s").removesuffix("step")))
        else:
            value = float(raw) * steps_per_epoch
    except (ValueError, OverflowError):
        raise ConfigError(
            expected(arg, wanted, text, "Use a number of epochs or append 'steps'.")
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            expected(
                arg,
                f"a finite, non-negative number of {wanted}",
                text,
                "Use e.g. 10 (epochs) or 250steps.",
            )
        )
    return round(value)


def auto_mode(job: TrainJob) -> bool:
    """Whether the job's OIALR runs in auto mode; its ``auto``, ``preset``, ``delay``, ``beta``
    and ``plan`` checked against each other first (before any work).

    Raises:
        ConfigError: ``auto=True`` with the reference preset or with a delay, beta or plan;
            ``auto=False`` with the ``bstab`` preset and none of them (nothing to train by).
    """
    given = job.delay is not None or job.beta is not None or job.plan is not None
    reference = job.preset == "reference"
    if job.auto not in (None, True, False):
        raise ConfigError(expected("auto", "None, True or False", job.auto, "None picks."))
    if job.auto and reference:
        raise ConfigError(
            'Expected `preset="bstab"` with `auto=True` but got `preset="reference"`: the '
            "reference has no auto mode. Drop `auto=True` (and give `delay` and `beta`), or drop "
            '`preset="reference"`.',
            argument=("preset", "auto", "delay", "beta"),
        )
    if job.auto and given:
        raise ConfigError(
            "`auto=True` chooses delay and beta itself; drop `delay`, `beta` and `plan`, or "
            "`auto=True`.",
            argument=("auto", "delay", "beta", "plan"),
        )
    if job.target_share is not None and (given or reference or job.auto is False):
        raise ConfigError(
            expected(
                "target_share",
                "auto mode (it picks auto mode's beta)",
                job.target_share,
                "Drop `target_share`, or drop `delay`, `beta`, `plan`, `auto=False` and "
                '`preset="reference"`.',
            ),
            argument=("delay", "beta", "plan", "auto", "preset"),
        )
    if job.target_share is not None and not 0 < job.target_share <= 1:
        raise ConfigError(expected("target_share", "in (0, 1]", job.target_share, "Use e.g. 0.2."))
    if job.auto is False and not given and not reference:
        raise ConfigError(
            "Expected `delay`, `beta` or `plan` with `auto=False` but got none of them, so "
            'there is no fixed schedule to train by. Give e.g. `delay="5"` and `beta=0.15` (or '
            '`plan="plan.json"`), or drop `auto=False` for auto mode.',
            argument=("delay", "beta", "plan", "auto"),
        )
    return job.auto is not False and not given and not reference


def oialr_config(job: TrainJob, model: torch.nn.Module, steps_per_epoch: int):
    """The OIALR settings the job asks for: explicit values, a plan.json, or auto, then the
    job's ``overrides``."""
    import dataclasses

    from .training.oialr import OIALRConfig

    cfg = _oialr_config(job, model, steps_per_epoch)
    if not job.overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(OIALRConfig)} - {"preset"}
    unknown = sorted(set(job.overrides) - known)
    if unknown:
        raise ConfigError(
            expected(
                "overrides",
                "OIALRConfig fields",
                unknown,
                f"Use some of: {', '.join(sorted(known))}.",
            )
        )
    return dataclasses.replace(cfg, **job.overrides)


def _oialr_config(job: TrainJob, model: torch.nn.Module, steps_per_epoch: int):
    from .lowrank.surgery import FactorizeConfig
    from .recommend.plan import Plan, check_plan_matches
    from .training.oialr import BETA, PRESETS, OIALRConfig, epoch_defaults

    if job.preset not in PRESETS:
        raise ConfigError(
            expected("preset", " or ".join(PRESETS), job.preset, "bstab is the default.")
        )
    auto = auto_mode(job)
    total = steps_per_epoch * job.train.epochs
    defaults = epoch_defaults(steps_per_epoch, total)
    reference = job.preset == "reference"
    keep = {
        "keep_first": bool(job.keep_first),
        "keep_last": reference if job.keep_last is None else job.keep_last,
    }
    moments = job.moments or ("slice" if reference else "reset")
    common = {"moments": moments, "total_steps": total}

    def fixed(delay: int, interval: int, beta: float) -> OIALRConfig:
        if reference:
            return OIALRConfig.reference(delay, interval, beta, **keep, **common)
        factorize = FactorizeConfig(**keep)
        return OIALRConfig(delay=delay, interval=interval, beta=beta, factorize=factorize, **common)

    if job.plan is not None:
        fix = "Analyse a run of this model and pass its plan, or drop `plan`."
        check_plan_matches(Plan.from_json(job.plan), model, fix)
        given = {}
        if job.interval is not None:  # an interval given replaces the plan's
            given["interval"] = _interval_steps(job, steps_per_epoch)
        preset = {"preset": "reference", **keep} if reference else {}
        factorize = {} if reference else {"factorize": FactorizeConfig(**keep)}
        return OIALRConfig.from_plan(
            job.plan, steps_per_epoch, **preset, **factorize, **given, **common
        )
    interval = _interval_steps(job, steps_per_epoch)
    if auto:
        return OIALRConfig(
            auto=True,
            interval=interval,
            check_every=defaults["check_every"],
            beta=None,
            factorize=FactorizeConfig(**keep),
            **({"plan": _share_rule(job.target_share)} if job.target_share else {}),
            **common,
        )
    delay = parse_steps(job.delay, "delay", steps_per_epoch)
    delay = defaults["delay"] if delay is None else delay
    return fixed(delay, interval, BETA if job.beta is None else job.beta)


def _share_rule(target: float):
    from .recommend import PlanConfig

    return PlanConfig(beta_rule="share", target_share=target)


def _interval_steps(job: TrainJob, steps_per_epoch: int) -> int:
    """``interval`` in steps (the default, ``INTERVAL_EPOCHS``, when not given); under one
    step is an error."""
    from .training.oialr import INTERVAL_EPOCHS

    interval = parse_steps(job.interval, "interval", steps_per_epoch)
    interval = INTERVAL_EPOCHS * steps_per_epoch if interval is None else interval  # 0 is an error
    if interval < 1:
        raise ConfigError(
            expected(
                "interval", "at least one step", job.interval, 'Use e.g. `interval="5"` (epochs).'
            )
        )
    return interval


NEVER_CONVERTED_FIX = "train longer (`epochs`), or give `delay` and `beta`"


def run_train_job(
    job: TrainJob,
    run_path: str | Path,
    export_path: str | Path | None = None,
    mode: str = "create",
    progress: bool = True,
) -> TrainResult:
    """Train a built-in model (full-rank or OIALR), record it, export the factorised model."""
    import time

    from .api import train
    from .training.oialr import OIALR

    if job.mode not in ("full", "oialr"):
        raise ConfigError(expected("mode", "full or oialr", job.mode, "oialr is the default."))
    if export_path is not None and mode != "overwrite":  # before any work, like the run file
        refuse_existing(export_path, "export_path", _EXPORT_EXISTS)
    model, data = build(
        RecordJob(model=job.model, dataset=job.dataset, train=job.train, device=job.device)
    )
    steps_per_epoch = math.ceil(len(data.x_train) / job.train.batch_size)
    optimizer = make_optimizer(model, job.train)
    oialr = None  # built before the run file, so a config it refuses leaves no file behind
    if job.mode == "oialr":
        oialr = OIALR(model, optimizer, oialr_config(job, model, steps_per_epoch))
    meta = {"job": _train_metadata(job, data.task, steps_per_epoch)}
    start = time.perf_counter()
    with Recorder(model, run_path, RecordConfig(metadata=meta), mode=mode) as rec:
        done = train(
            model,
            data,
            job.train,
            oialr=oialr,
            optimizer=optimizer,
            recorder=rec,
            progress=progress,
        )
        events = list(oialr.events) if oialr else []
        never = _log_never_converted(oialr, rec) if oialr else None
        if never is not None:
            events.append(never)
    result = _train_result(job, run_path, done.history, time.perf_counter() - start, oialr, data)
    result.events, result.never_converted = events, never["message"] if never else None
    if oialr is not None and export_path is not None:
        example = data.x_test[:256].to(job.device)
        _export(model, export_path, run_path, result, example, force=mode == "overwrite")
    return result


def _train_metadata(job: TrainJob, task: str, steps_per_epoch: int) -> dict[str, Any]:
    """The job as the run file keeps it (``/meta``'s ``job``)."""
    return {
        "kind": "train",
        **{k: v for k, v in asdict(job).items() if k != "train"},
        "task": task,
        "train": asdict(job.train),
        "steps_per_epoch": steps_per_epoch,
    }


def _log_never_converted(oialr: Any, rec: Recorder) -> dict[str, Any] | None:
    """An auto run that ended full-rank says so, in the run file too; its event, or None."""
    message = oialr.never_converted_summary(NEVER_CONVERTED_FIX)
    if message is None:
        return None
    record = {"step": oialr.steps, "event": "never-converted", "message": message}
    record.update({k: v for k, v in oialr.never_converted().items() if k != "steps"})
    rec.log_event(record)
    return record


def _train_result(job, run_path, history, seconds, oialr, data) -> TrainResult:
    return TrainResult(
        Path(run_path),
        None,
        history,
        seconds,
        oialr.trainable_share() if oialr else 1.0,
        oialr.factorised_share() if oialr else 1.0,
        [],
        task=data.task,
        unit=data.unit,
        kept_dense=oialr.dense_summary() if oialr else None,
        ranks=oialr.ranks() if oialr else {},
        dense_layers=oialr.dense_layers() if oialr else [],
    )


def _export(
    model, export_path, run_path, result: TrainResult, example: torch.Tensor, force: bool
) -> None:
    """Save the factorised model and compare it with its dense equivalent on ``example``."""
    from .api import export
    from .exporting.factorized import compare_export, dense_copy

    try:
        exported = export(model, export_path, force=force)
    except RunFileError as exc:  # the run itself is complete: say so
        raise type(exc)(f"{exc} The run {run_path} is complete.", argument=exc.arguments) from None
    result.export_path = Path(export_path)
    result.export = compare_export(dense_copy(model), exported, example)


_EXPORT_EXISTS = Message(
    "It is where this run's factorised model would be saved; move it away, or overwrite both "
    '(`mode="overwrite"`)',
    ["mode"],
)
