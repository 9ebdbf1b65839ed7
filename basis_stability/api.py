"""The verbs of the public API: each wires the stages and adds no rule of its own.

``record`` starts a :class:`~.recording.Recorder`; ``analyze`` measures a run
(:mod:`.analysis`) and makes the plan from its tables (:mod:`.recommend`); ``compare`` lays the
analyses of several runs side by side (:mod:`.analysis.compare`); ``train`` runs the
plain loop with OIALR attached (:mod:`.training`); ``export`` writes the compact model
(:mod:`.exporting`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    Message,
    RunFileError,
    Shown,
    a_or_an,
    check_config,
    expected,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .analysis.compare import Comparison, RunInput
    from .analysis.config import EngineConfig
    from .analysis.live import LiveStability
    from .analysis.report import AnalysisConfig, Report
    from .recommend.plan import Plan, PlanConfig
    from .recording.recorder import RecordConfig, Recorder
    from .recording.schedules import Schedule
    from .training.loop import TrainConfig
    from .training.oialr import OIALR, OIALRConfig
    from .zoo.datasets import Dataset


def record(
    model: nn.Module,
    path: str | Path,
    config: RecordConfig | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: Schedule | None = None,
    steps_per_epoch: int | None = None,
    mode: str = "create",
    live: LiveStability | None = None,
    **options: Any,
) -> Recorder:
    """Start recording ``model``'s layer weights into the run file ``path``.

    With ``optimizer`` and ``schedule`` (e.g. ``every(100)``) the recorder snapshots by itself
    after the scheduled optimizer steps; without, call ``snapshot()`` where you want one.
    ``live=bs.LiveStability(tensorboard="runs/tb")`` logs each layer's S against the snapshot
    before, and the mean S, at every snapshot (:class:`~.analysis.live.LiveStability`).
    ``options`` are :class:`~.recording.RecordConfig` fields (``include``, ``dtype``...).

    Returns:
        The open :class:`~.recording.Recorder`; use it as a context manager (or ``close()``
        it), so the last snapshot is committed and the file is closed cleanly.

    Example:
        >>> with bs.record(model, "run.h5", optimizer=opt, schedule=bs.every(50)):  # doctest: +SKIP
        ...     train(model, opt)
    """
    from .recording.recorder import Recorder

    if (optimizer is None) != (schedule is None):
        given, missing = (
            ("optimizer", "schedule") if schedule is None else ("schedule", "optimizer")
        )
        raise ConfigError(
            expected(
                missing,
                f"given together with `{given}` (the schedule counts the optimizer's steps)",
                None,
                "Pass both, or neither and call snapshot() yourself.",
            )
        )
    recorder = Recorder(model, path, config, mode=mode, live=live, **options)
    if optimizer is not None:
        recorder.attach(optimizer, schedule, steps_per_epoch=steps_per_epoch)
    return recorder


def analyze(
    path: str | Path,
    config: AnalysisConfig | None = None,
    engine: EngineConfig | None = None,
    plan: PlanConfig | None = None,
    progress: bool = False,
) -> Report | None:
    """Analyse a run (also one still being recorded): the tables, then the OIALR plan.

    ``path``, ``config``, ``engine`` and ``progress`` are :func:`~.analysis.measure`'s;
    ``plan`` holds the thresholds of the delay and beta rules (:class:`~.recommend.PlanConfig`)
    that :func:`~.recommend.assess` applies.

    Returns:
        A :class:`~.analysis.Report`: tidy DataFrames, notes and the plan (None when no
        snapshot has every layer's full spectrum). Under torch.distributed every rank must
        call this; rank 0 gets the report and the others None.

    Example:
        >>> report = bs.analyze("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
        >>> report.summary[["layer", "final_S", "stable_from_epoch"]]  # doctest: +SKIP
    """
    from .analysis.report import measure
    from .recommend.plan import PlanConfig, assess

    check_config("plan", plan, PlanConfig)  # before the work, not after it
    measured = measure(path, config, engine, progress=progress)
    return None if measured is None else assess(measured, plan)


def compare(
    paths: list[str | Path],
    out_dir: str | Path | None = None,
    *,
    config: AnalysisConfig | None = None,
    engine: EngineConfig | None = None,
    plan: PlanConfig | None = None,
    force: bool = False,
    progress: bool = False,
) -> Comparison | None:
    """Analyse two or more runs and lay them side by side: seeds, full rank against OIALR,
    learning rates.

    Each run is analysed as :func:`analyze` does (same ``config``, ``engine`` and ``plan``;
    SVDs cached beside each run) and labelled by its file stem without the parts all stems
    share. Runs are aligned by epoch; layers not in every run are compared where present.

    Args:
        paths: the run files, the first being the reference of the differences. A file given
            twice is compared once (with a note).
        out_dir: when given, the tables (CSV) and figures (PNG, SVG) are written there,
            checked before any analysis (:mod:`.analysis.compare_output`).
        force: overwrite files in ``out_dir`` named like the outputs; without it an existing
            one is refused and nothing is written.

    Returns:
        A :class:`~.analysis.compare.Comparison`: ``runs``, ``layers`` (final S per run and
        the difference to the first), ``layer_ranks``, ``network``, ``metrics``, ``notes`` and
        ``text()``. Under torch.distributed every rank must call this; rank 0 gets it, the
        others None.

    Raises:
        ConfigError: fewer than two different runs, or ``out_dir`` is a file.
        RunFileError: a run is missing or damaged (the message names it).
        RunExistsError: ``out_dir`` holds an output file and ``force`` is false.

    Example:
        >>> cmp = bs.compare(["runs/full.h5", "runs/oialr.h5"], "runs/cmp")  # doctest: +SKIP
        >>> cmp.layers  # doctest: +SKIP
    """
    from . import _dist
    from .analysis.compare import check_paths, combine, short_labels
    from .analysis.compare_output import check_out_dir, write_comparison
    from .recommend.plan import PlanConfig

    check_config("plan", plan, PlanConfig)
    runs, notes = check_paths(paths)
    if out_dir is not None:
        check_out_dir(out_dir, force)
    labelled = zip(runs, short_labels(runs))
    inputs = [
        _compare_input(path, label, config, engine, plan, progress) for path, label in labelled
    ]
    if not _dist.is_writer():
        return None  # under torch.distributed only rank 0 gathers the reports
    comparison = combine(inputs, notes)
    if out_dir is not None:
        write_comparison(comparison, out_dir, force)
    return comparison


def _compare_input(
    path: Path,
    label: str,
    config: AnalysisConfig | None,
    engine: EngineConfig | None,
    plan: PlanConfig | None,
    progress: bool,
) -> RunInput | None:
    """One run of :func:`compare`: its label, analysis and snapshot table (None off rank 0)."""
    from . import _dist
    from .analysis.compare import RunInput, snapshot_table

    report = analyze(path, config, engine, plan, progress=progress)
    if report is None:
        if _dist.world_size() > 1:
            return None
        raise RunFileError(f"Cannot compare {path}: its analysis returned nothing.")
    return RunInput(label, report, snapshot_table(path))


@dataclass
class Training:
    """What :func:`train` did: one metrics dict per epoch, and the OIALR controller (None for
    full-rank training), whose ``events``, ``ranks()`` and ``trainable_share()`` tell the rest."""

    history: list[dict[str, float]]
    oialr: OIALR | None = None
    notes: list[str] = field(default_factory=list)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig | None = None,
    *,
    oialr: OIALR | OIALRConfig | Plan | str | Path | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    recorder: Recorder | None = None,
    progress: bool = True,
) -> Training:
    """Train ``model`` on ``data`` with the plain loop, optionally with OIALR attached.

    Args:
        model, data: the network and a :class:`~.zoo.Dataset` (tensors and a task).
        config: the loop's settings (:class:`~.training.TrainConfig`).
        oialr: None for full-rank training; ``"auto"`` (auto mode, checking once per epoch
            and updating every ``INTERVAL_EPOCHS`` epochs of this training); an
            :class:`~.training.OIALRConfig` (in optimizer steps); a plan (a
            :class:`~.recommend.Plan` or its plan.json) whose delay, interval and beta it
            follows (:meth:`~.training.OIALRConfig.from_plan`); or an :class:`~.training.OIALR`
            controller already built on ``optimizer``.
        optimizer: defaults to the config's (:func:`~.training.make_optimizer`).
        recorder: when given, a snapshot after every epoch with the epoch's metrics (and,
            under OIALR, ``trainable_share``, ``factorised_share`` and ``rank/<layer>``), and
            OIALR's decisions logged in its run file.
        progress: a progress bar over the epochs.

    Example:
        >>> with bs.record(model, "run.h5") as rec:  # doctest: +SKIP
        ...     done = bs.train(model, data, bs.TrainConfig(epochs=20), oialr="auto", recorder=rec)
        >>> done.oialr.ranks()  # doctest: +SKIP
    """
    from .training.loop import TrainConfig, fit, make_optimizer, steps_per_epoch
    from .training.oialr import OIALR

    _check_data(data)
    check_config("config", config, TrainConfig)
    config = config or TrainConfig()
    if isinstance(oialr, OIALR) and optimizer is None:
        optimizer = oialr.optimizer  # the controller's own
    optimizer = optimizer or make_optimizer(model, config)
    per_epoch = steps_per_epoch(len(data.x_train), config.batch_size)
    controller = _controller(oialr, model, optimizer, per_epoch * config.epochs, per_epoch)
    if controller is not None and recorder is not None:
        controller.on_event = recorder.log_event

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        if recorder is not None:
            extra = _oialr_metrics(controller) if controller is not None else {}
            recorder.snapshot(epoch=epoch, step=epoch * per_epoch, metrics={**metrics, **extra})

    try:
        history = fit(model, data, config, optimizer, on_epoch_end=on_epoch_end, progress=progress)
    finally:
        if controller is not None:
            controller.close()
    return Training(history, controller)


def _check_data(data: object) -> None:
    from .zoo.datasets import Dataset

    if not isinstance(data, Dataset):
        raise ConfigError(
            expected(
                "data",
                "a basis_stability.zoo.Dataset",
                Shown(a_or_an(type(data).__name__)),
                "Wrap your tensors: Dataset(name, x_train, y_train, x_test, y_test, "
                "num_classes), or train in your own loop with bs.record and bs.OIALR.",
            )
        )


def _controller(
    oialr: Any, model: nn.Module, optimizer: Any, total_steps: int, per_epoch: int
) -> OIALR | None:
    """The OIALR controller ``train`` was asked for, attached to ``optimizer``."""
    from .training.oialr import OIALR, OIALRConfig, epoch_defaults

    if oialr is None:
        return None
    if isinstance(oialr, OIALR):
        if oialr.optimizer is not optimizer:
            raise ConfigError(
                expected(
                    "optimizer",
                    "the optimizer the OIALR controller was built on",
                    type(optimizer).__name__,
                    "Drop `optimizer`, or build the controller on it.",
                )
            )
        return oialr.attach()
    if isinstance(oialr, str) and oialr == "auto":
        defaults = epoch_defaults(per_epoch, total_steps)
        cfg = OIALRConfig(
            auto=True,
            interval=defaults["interval"],
            check_every=defaults["check_every"],
            beta=None,
            total_steps=total_steps,
        )
    elif isinstance(oialr, OIALRConfig):
        cfg = oialr
    else:
        _check_plan_argument(oialr)
        cfg = OIALRConfig.from_plan(oialr, per_epoch, model=model, total_steps=total_steps)
    return OIALR(model, optimizer, cfg).attach()


def _check_plan_argument(oialr: object) -> None:
    """``oialr`` that is none of the other choices must be a Plan or an existing plan file."""
    from .recommend.plan import Plan

    if isinstance(oialr, Plan) or (isinstance(oialr, (str, Path)) and Path(oialr).is_file()):
        return
    raise ConfigError(
        expected(
            "oialr",
            'None, "auto", an OIALRConfig, a Plan, the path of a plan.json or an OIALR',
            oialr,
            "A plan file is written by bs.analyze(run).plan.to_json(path) or `bstab analyze`.",
        )
    )


def _oialr_metrics(controller: OIALR) -> dict[str, float]:
    """What a snapshot under OIALR records besides the loop's metrics."""
    return {
        "trainable_share": controller.trainable_share(),
        "factorised_share": controller.factorised_share(),
        **{f"rank/{name}": rank for name, rank in controller.ranks().items()},
    }


def export(model: nn.Module, path: str | Path | None = None, *, force: bool = False) -> nn.Module:
    """The compact copy of a model trained with OIALR: each low-rank layer as two thin factors
    (dense layers as they are), for inference (:func:`~.exporting.export_factorized`).

    Args:
        model: the trained (partly) low-rank model; it is not changed.
        path: when given, the exported model is also saved there with ``torch.save`` (through
            a temporary file beside it, so an interrupted save leaves no half file).
        force: overwrite an existing ``path``; without it an existing file is refused before
            anything is exported.

    Raises:
        RunExistsError: ``path`` exists and ``force`` is false (it is left untouched).
        RunFileError: ``path`` cannot be written.
    """
    import torch

    from .exporting.factorized import export_factorized
    from .store.paths import refuse_existing, write_atomically

    if path is not None and not force:
        refuse_existing(path, "path", _OVERWRITE)
    exported = export_factorized(model)
    if path is not None:
        try:
            write_atomically(
                path, lambda tmp: torch.save(exported, tmp), force=force, argument="path"
            )
        except IsADirectoryError:
            raise ConfigError(
                expected("path", "a file, not a folder", str(path), "Name a .pt file in it.")
            ) from None
        except OSError as exc:
            if isinstance(exc, RunFileError):
                raise
            raise RunFileError(
                f"Cannot write the exported model to `path` {path} ({exc.strerror or exc}). "
                "Choose a writable path.",
                argument="path",
            ) from None
    return exported


_OVERWRITE = Message("Pass `force=True` to overwrite it, or choose another `path`", ["force"])
