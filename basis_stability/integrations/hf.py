"""Hugging Face Transformers: record a ``Trainer`` run, and train it with OIALR.

    from basis_stability.integrations.hf import RecordTrainerCallback, OIALRTrainer

    trainer = Trainer(model, args, train_dataset=..., callbacks=[RecordTrainerCallback("run.h5")])
    trainer.train()

:class:`RecordTrainerCallback` snapshots at every epoch end (after that epoch's evaluation, with
its metrics, when ``eval_strategy="epoch"``) or after the optimizer steps a schedule selects; only
global rank 0 writes. ``trainer.train(resume_from_checkpoint=...)`` appends to the same run after
the snapshots taken up to the checkpoint's global step; later ones (from the training that was
rolled back) move to a backup file beside the run.

OIALR changes the model's parameter set, which a pure ``TrainerCallback`` cannot carry through a
checkpoint: the weights of a checkpoint taken after conversion only load into a model that already
has the low-rank layers, and the Trainer loads them before any callback runs. So OIALR comes as
:class:`OIALRTrainer`, a ``Trainer`` subclass with two small additions: a callback that steps the
controller after every optimizer step (swapping the optimizer's parameters and state), and a
checkpoint hook that saves ``oialr.json`` beside the weights and rebuilds the low-rank layers
before they are loaded on resume. Single process only (the Trainer's DDP wrapper cannot be
rebuilt mid-training).

Needs ``pip install 'basis_stability[hf]'`` (``transformers`` and ``accelerate``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..analysis.live import TAG_PREFIX, LiveStability
from ..errors import ConfigError
from ..lowrank.optim_state import match_model_order
from ..lowrank.surgery import rebuild_low_rank
from ..recording.schedules import Schedule
from ._common import RecordSession, require, scalars

_tf = require("transformers", "hf", "The Hugging Face integration")
require("accelerate", "hf", "The Hugging Face Trainer")
log = logging.getLogger(__name__)

__all__ = ["OIALRTrainer", "RecordTrainerCallback"]

OIALR_STATE_NAME = "oialr.json"
_SKIP = {"epoch", "step", "total_flos"}


def _live(key: str) -> bool:
    """Whether a logged key is a live value (``stability/...``, possibly with the ``train/``
    prefix an integration adds): the run has them already, so snapshots do not store them."""
    return key.startswith(TAG_PREFIX) or key.startswith(f"train/{TAG_PREFIX}")


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (hooks must go on the real one)."""
    return getattr(optimizer, "optimizer", optimizer)


class RecordTrainerCallback(_tf.TrainerCallback):
    """Record a ``transformers`` model's layer matrices into a run file during ``train()``.

    Args:
        path: the run file (``.h5``).
        schedule: None or ``"epoch"`` (default): at every epoch end; or a step schedule
            (``every(50)``, ``"every:50"``, ``"at:1,10,100"``, ``"log:30:5000"``).
        mode: ``create`` (refuse an existing run), ``overwrite`` or ``append``; a resumed
            ``train()`` always appends.
        live: e.g. ``basis_stability.LiveStability()``: at every snapshot after the first, each
            layer's S against the snapshot before (``stability/S/<layer>``) and the mean S
            (``stability/S_mean``) go through ``trainer.log`` at the snapshot's step, so to
            every ``report_to`` integration, every callback's ``on_log`` and
            ``state.log_history``, shortly after the snapshot (they are measured on the
            recorder's writer thread). A callback is not given its trainer, so call
            :meth:`attach`.
        **record: :class:`~basis_stability.recording.RecordConfig` fields (``include``,
            ``exclude``, ``types``, ``dtype``, ``initial``, ``metadata``, ``biases``).
    """

    def __init__(
        self,
        path: str | Path,
        schedule: Schedule | str | None = None,
        *,
        mode: str = "create",
        live: LiveStability | None = None,
        **record: Any,
    ) -> None:
        self.session = RecordSession(path, schedule, mode=mode, record=record, live=live)
        self.trainer: Any = None  # the Trainer whose log() gets the live values (attach)
        self._pending: tuple[float, int] | None = None  # an epoch end awaiting its evaluation
        self._logged = 0  # log_history entries already attached to a snapshot
        self._eval: dict[str, float] = {}

    @property
    def recorder(self):
        """The :class:`~basis_stability.recording.Recorder` while training, else None."""
        return self.session.recorder

    def attach(self, trainer: Any) -> RecordTrainerCallback:
        """Record ``trainer``'s training (add this callback to it unless it has it) and send
        the live values through its ``log``.

        Example:
            >>> rec = RecordTrainerCallback("run.h5", live=bs.LiveStability())  # doctest: +SKIP
            >>> rec.attach(Trainer(model, args, train_dataset=data))  # doctest: +SKIP
            >>> rec.trainer.train()  # doctest: +SKIP
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _send_live(self, wait: bool = False) -> None:
        if self.trainer is not None:
            self.session.send_live(self._log_at, wait=wait)

    def _log_at(self, step: int, values: dict[str, float]) -> None:
        """``trainer.log(values)`` at optimizer step ``step``: the integrations stamp a log
        with ``state.global_step``, so it is that step during the call."""
        state = self.trainer.state
        now, state.global_step = state.global_step, step
        try:
            self.trainer.log(dict(values))
        finally:
            state.global_step = now

    def _metrics(self, state: Any) -> dict[str, float]:
        merged: dict[str, float] = {}
        for entry in state.log_history[self._logged :]:
            merged.update(
                {k: v for k, v in scalars(entry).items() if k not in _SKIP and not _live(k)}
            )
        self._logged = len(state.log_history)
        merged.update(self._eval)
        self._eval = {}
        return merged

    def _flush(self, state: Any) -> None:
        if self._pending is not None:
            epoch, step = self._pending
            self._pending = None
            self.session.epoch_end(epoch, step, self._metrics(state))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if state.global_step > 0 and self.session.recorder is None:
            self.session.resume_after_step(state.global_step)
        self._logged = len(state.log_history)
        self.session.open(model)
        if self.session.live is not None and self.trainer is None:
            log.warning(
                "RecordTrainerCallback(live=...) is not attached to its Trainer, so the live "
                "values reach no report_to logger (TensorBoard only when LiveStability has a "
                "directory, and callback.recorder.live_metrics()); call callback.attach(trainer)"
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self._flush(state)  # the weights have not moved since the epoch ended

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self.session.schedule is not None and self.session.schedule(state.global_step):
            self.session.step(state.global_step, float(state.epoch), self._metrics(state))
        self._send_live()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self.session.schedule is None:
            self._pending = (float(round(state.epoch)), state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any):
        self._eval.update({k: v for k, v in scalars(metrics or {}).items() if k not in _SKIP})
        self._flush(state)
        self._send_live()

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._flush(state)
        self._send_live(wait=True)
        self.session.close()


class _OIALRStep(_tf.TrainerCallback):
    """Steps the OIALR controller after every optimizer step of an :class:`OIALRTrainer`."""

    def __init__(self, trainer: OIALRTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self.trainer._start_oialr()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        oialr = self.trainer.oialr
        if oialr is not None and oialr.step():
            # keep the optimizer's order equal to a fresh one's, so its checkpoints load back
            match_model_order(_inner(self.trainer.optimizer), self.trainer.model)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any):
        oialr = self.trainer.oialr
        folder = (
            Path(args.output_dir) / f"{_tf.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        if oialr is not None and state.is_world_process_zero and folder.is_dir():
            (folder / OIALR_STATE_NAME).write_text(json.dumps(oialr.state(), indent=1))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        oialr = self.trainer.oialr
        if oialr is None:
            return
        for line in (oialr.never_converted_summary(), oialr.dense_summary()):
            if line is not None:  # an auto run that ended full-rank; layers kept dense
                log.warning("%s", line)
        oialr.close()


class OIALRTrainer(_tf.Trainer):
    """A ``transformers.Trainer`` that trains with OIALR.

    Args:
        *args, **kwargs: as for ``Trainer``.
        oialr_config: an :class:`~basis_stability.training.oialr.OIALRConfig` (delay, interval and
            beta in optimizer steps, or ``auto=True``); default: auto.
        oialr_filter: ``(name, module) -> bool``, the last word on which layers are factorised.
        recorder: a :class:`RecordTrainerCallback` to store every OIALR decision in the run's
            ``/events``; it is attached to this trainer (added to its callbacks if absent, and
            its live stability sent through this trainer's ``log``).

    After ``train()``, ``trainer.oialr`` holds the controller (ranks, trainable share, events);
    an auto run that ended before conversion logs one warning line saying so (see
    :meth:`~basis_stability.training.oialr.OIALR.never_converted_summary`).
    """

    def __init__(
        self,
        *args: Any,
        oialr_config: Any = None,
        oialr_filter: Any = None,
        recorder: RecordTrainerCallback | None = None,
        **kwargs: Any,
    ) -> None:
        from ..training.oialr import OIALRConfig

        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ConfigError(
                f"Expected a single-process Trainer for OIALRTrainer but it runs "
                f"{self.args.world_size} processes. OIALR changes the parameter set, which the "
                "Trainer's DDP wrapper cannot follow; use basis_stability.OIALR in a plain "
                "torch.distributed loop (it re-wraps DDP)."
            )
        self.oialr_config = oialr_config or OIALRConfig(auto=True)
        self.oialr_filter = oialr_filter
        self.oialr_recorder = recorder
        if recorder is not None:  # its live values go through this trainer's log
            recorder.attach(self)
        self.oialr = None
        self._oialr_restored: dict[str, Any] | None = None
        self.add_callback(_OIALRStep(self))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        path = Path(resume_from_checkpoint) / OIALR_STATE_NAME
        self._oialr_restored = json.loads(path.read_text()) if path.is_file() else None
        ranks = (self._oialr_restored or {}).get("ranks")
        if ranks:  # the checkpoint's weights are low-rank: rebuild those layers first
            rebuild_low_rank(
                model or self.model, ranks, self.oialr_config.factorize, self.oialr_filter
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _start_oialr(self) -> None:
        from ..training.oialr import OIALR

        if self.oialr is not None:
            self.oialr.close()
        optimizer = _inner(self.optimizer)
        self.oialr = OIALR(self.model, optimizer, self.oialr_config, self.oialr_filter)
        rec = self.oialr_recorder
        if rec is not None:
            self.oialr.on_event = lambda e: rec.recorder.log_event(e) if rec.recorder else None
        if self._oialr_restored:
            self.oialr.load_state(self._oialr_restored)
