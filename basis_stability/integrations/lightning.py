"""PyTorch Lightning: record a fit, and train it with OIALR, from two callbacks.

    from basis_stability.integrations.lightning import RecordCallback, OIALRCallback

    trainer = L.Trainer(max_epochs=30, callbacks=[RecordCallback("run.h5")])
    trainer.fit(model, train_loader, val_loader)

:class:`RecordCallback` snapshots at every epoch end (after validation, with the logged
metrics), or after the optimizer steps a schedule selects; only global rank 0 writes. Its state
travels in Lightning checkpoints: ``trainer.fit(..., ckpt_path=...)`` appends to the same run,
after the snapshots that existed when the checkpoint was saved.

:class:`OIALRCallback` runs the OIALR controller inside ``fit()``: it converts and truncates the
LightningModule's layers in place and carries the optimizer's state across (policy ``reset``,
``slice`` or ``rotate``). A checkpoint taken after conversion holds the factors; resuming from it
rebuilds the low-rank layers at the checkpoint's ranks before Lightning loads the weights.
It needs a single-process strategy: under DDP the parameter set changes, and Lightning's DDP
wrapper cannot be rebuilt from a callback (use :class:`~basis_stability.training.oialr.OIALR` in a
plain loop, which re-wraps, for multi-process training).

Needs ``pip install 'basis_stability[lightning]'`` (the ``lightning`` package).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..lowrank.optim_state import match_model_order
from ..lowrank.surgery import rebuild_low_rank
from ..recording.schedules import Schedule
from ._common import RecordSession, require

if TYPE_CHECKING:
    from ..analysis.live import LiveStability

_pl = require("lightning.pytorch", "lightning", "The Lightning integration")
log = logging.getLogger(__name__)

__all__ = ["OIALRCallback", "RecordCallback"]


def _epoch_of(trainer: Any, step: int) -> float:
    """The fractional epoch of optimizer step ``step`` (NaN when the epoch length is unknown)."""
    n = trainer.num_training_batches
    if not isinstance(n, (int, float)) or n in (0, float("inf")):
        return math.nan
    return step / (n / max(trainer.accumulate_grad_batches, 1))


class RecordCallback(_pl.Callback):
    """Record a LightningModule's layer matrices into a run file during ``fit()``.

    Args:
        path: the run file (``.h5``).
        schedule: None or ``"epoch"`` (default): at every training-epoch end, after validation;
            or a step schedule: ``every(50)``, ``at([...])``, ``logspaced(...)``, or the text
            forms ``"every:50"``, ``"at:1,10,100"``, ``"log:30:5000"``.
        mode: ``create`` (refuse an existing run), ``overwrite`` or ``append``; a fit resumed
            from a checkpoint always appends.
        live: e.g. ``basis_stability.LiveStability()``: at every snapshot after the first, each
            layer's S against the snapshot before (``stability/S/<layer>``) and the mean S
            (``stability/S_mean``) go to every logger of the trainer
            (``logger.log_metrics(values, step=<the snapshot's step>)``), shortly after the
            snapshot (they are measured on the recorder's writer thread).
        **record: :class:`~basis_stability.recording.RecordConfig` fields (``include``,
            ``exclude``, ``types``, ``dtype``, ``initial``, ``metadata``, ``biases``).

    Snapshots are stamped with the global step and the epoch (``current_epoch + 1`` at epoch
    end; fractional for step schedules) and carry the scalar ``trainer.callback_metrics``.
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
        super().__init__()
        self.session = RecordSession(path, schedule, mode=mode, record=record, live=live)

    @property
    def state_key(self) -> str:
        """The checkpoint key: the run's resolved absolute path, the same from any cwd."""
        return self._key_for(self.session.path)

    def _key_for(self, path: str | Path) -> str:
        return f"{type(self).__name__}[{Path(path).resolve()}]"

    @property
    def recorder(self):
        """The :class:`~basis_stability.recording.Recorder` while fitting, else None."""
        return self.session.recorder

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.open(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        self.session.step(step, _epoch_of(trainer, step), trainer.callback_metrics)
        self._send_live(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.epoch_end(
            float(trainer.current_epoch + 1), trainer.global_step, trainer.callback_metrics
        )
        self._send_live(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._send_live(trainer, wait=True)  # before the loggers are finalised
        self.session.close()

    def _send_live(self, trainer: Any, wait: bool = False) -> None:
        def send(step: int, values: dict[str, float]) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

        self.session.send_live(send, wait=wait)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.close()  # every committed snapshot is already on disk

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Accept a state saved under the path as given (before keys were resolved), when that
        path names this callback's run; Lightning calls :meth:`load_state_dict` right after."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = f"{type(self).__name__}["
        for key in list(states):
            old = isinstance(key, str) and key.startswith(prefix) and key.endswith("]")
            if old and self._key_for(key[len(prefix) : -1]) == self.state_key:
                states[self.state_key] = states[key]
                return

    def state_dict(self) -> dict[str, Any]:
        return {**self.session.state(), "path": str(self.session.path.resolve())}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.get("path")
        if saved is not None and Path(saved).resolve() == self.session.path.resolve():
            state["path"] = str(self.session.path)  # the same file, however it was spelled
        self.session.restore(state)


class OIALRCallback(_pl.Callback):
    """Train a LightningModule with OIALR inside ``fit()``.

    Args:
        config: an :class:`~basis_stability.training.oialr.OIALRConfig` (delay, interval and beta in
            optimizer steps, or ``auto=True``); default: auto.
        recorder: a :class:`RecordCallback` of the same fit, to store every OIALR decision in the
            run's ``/events``.
        filter_fn: ``(name, module) -> bool``, the last word on which layers are factorised.

    An auto run whose training ends before conversion logs one warning line saying so (see
    :meth:`~basis_stability.training.oialr.OIALR.never_converted_summary`).

    The LightningModule must build its optimizer from ``self.parameters()`` in
    ``configure_optimizers`` (one optimizer). Lightning calls ``configure_optimizers`` once, so
    a learning-rate scheduler keeps working: the optimizer object and its groups stay the same,
    only the parameters inside the groups are swapped.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        recorder: RecordCallback | None = None,
        filter_fn: Any = None,
    ) -> None:
        super().__init__()
        from ..training.oialr import OIALRConfig

        self.config = config or OIALRConfig(auto=True)
        self.recorder = recorder
        self.filter_fn = filter_fn
        self.oialr = None
        self._restored: dict[str, Any] | None = None
        self._last_step = -1
        self._unhook = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ConfigError(
                f"Expected a single-process Lightning strategy for OIALRCallback but the "
                f"trainer runs {trainer.world_size} processes. OIALR changes the parameter set, "
                "which Lightning's DDP wrapper cannot follow from a callback; train with "
                "basis_stability.OIALR in a plain torch.distributed loop (it re-wraps DDP)."
            )
        # Lightning loads a checkpoint's weights into the module before any callback sees the
        # checkpoint; the module's own on_load_checkpoint hook runs just before that, so the
        # low-rank layers of a checkpoint taken after conversion are rebuilt from there.
        if "on_load_checkpoint" not in vars(pl_module):
            original = pl_module.on_load_checkpoint
            key = self.state_key

            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                state = checkpoint.get("callbacks", {}).get(key)
                if state and state.get("ranks"):
                    rebuild_low_rank(
                        pl_module, state["ranks"], self.config.factorize, self.filter_fn
                    )
                original(checkpoint)

            pl_module.on_load_checkpoint = on_load_checkpoint
            self._unhook = lambda: vars(pl_module).pop("on_load_checkpoint", None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from ..training.oialr import OIALR

        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"Expected one optimizer for OIALRCallback but configure_optimizers returned "
                f"{len(trainer.optimizers)}. Use one optimizer over self.parameters()."
            )
        self.oialr = OIALR(pl_module, trainer.optimizers[0], self.config, self.filter_fn)
        if self.recorder is not None:
            self.oialr.on_event = lambda e: (
                self.recorder.recorder.log_event(e) if self.recorder.recorder else None
            )
        if self._restored:
            self.oialr.load_state(self._restored)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.oialr is None or trainer.global_step == self._last_step:
            return  # no optimizer step yet in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        if self.oialr.step():  # keep the optimizer's order = a fresh one's, for checkpoints
            match_model_order(trainer.optimizers[0], pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """An auto run that ends full-rank says so (last stable share, what would convert), and
        layers kept dense because their factors would not pay are named."""
        if self.oialr is None:
            return
        for line in (self.oialr.never_converted_summary(), self.oialr.dense_summary()):
            if line is not None:
                log.warning("%s", line)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.oialr is not None:
            self.oialr.close()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None

    def state_dict(self) -> dict[str, Any]:
        return self.oialr.state() if self.oialr is not None else dict(self._restored or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._restored = dict(state_dict)
