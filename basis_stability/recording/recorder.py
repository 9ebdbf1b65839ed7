"""The recorder: snapshots a model's layer matrices (and its biases and buffers) into a run file.

Three lines in a plain loop::

    with Recorder(model, "run.h5") as rec:          # also records the initial weights
        for epoch in range(1, epochs + 1):
            train_one_epoch(...)
            rec.snapshot(epoch=epoch, metrics={"loss": loss, "acc": acc})

or let the optimizer fire a schedule by itself::

    rec = Recorder(model, "run.h5").attach(optimizer, every(10))
    ...                                              # training; rec.log(loss=...) adds metrics
    rec.close()

A snapshot is copied into reused host buffers on the calling thread, and written, flushed and
committed by one background thread (:mod:`.background`) while training goes on; ``background=
False`` writes it on the calling thread instead.

The recorder's parts live beside it: :mod:`.config` (:class:`RecordConfig`, the step check),
:mod:`.state_plan` (which biases and buffers a snapshot stores, and how they are packed) and
:mod:`.gather` (an FSDP2 model's shards gathered onto rank 0); their public names are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _dist
from ..errors import (
    ConfigError,
    RunFileError,
    WriteFailedError,
    check_config,
    check_options,
    expected,
)
from ..store import state as st
from ..store.paths import as_path
from ..store.writer import check_metrics, encode_event
from ..views import Coverage, LayerView, Selection, measure_coverage, select_layers, unwrap_model
from .background import HostBuffers, WriterThread
from .config import TORCH_DTYPES, RecordConfig, check_step
from .gather import gather_to_rank0, is_dtensor, refuse_fsdp1
from .live import LiveHook, LiveOption, LiveValues, check_live
from .schedules import Schedule
from .state_plan import (
    STATE_NAMES,
    STATE_TORCH,
    StatePlan,
    plan_state,
    resolve_or_none,
    state_storage,
)

__all__ = [  # the recorder, and what moved out of this module (imported from here before)
    "RecordConfig",
    "Recorder",
    "StatePlan",
    "gather_to_rank0",
    "low_coverage_message",
    "plan_state",
    "state_storage",
    "to_storage",
]

log = logging.getLogger(__name__)

_MODES = ("create", "overwrite", "append")
_LOW_COVERAGE = 0.5  # warn when the recorded matrices hold less than this share


def _resolve(model: nn.Module, dotted: str) -> torch.Tensor:
    obj: Any = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_storage(view: LayerView, weight: torch.Tensor, dtype: str) -> np.ndarray:
    """One layer's tall matrix in host memory, in the storage dtype (bfloat16 as raw bits).

    A CPU tensor already in the storage dtype is viewed, not copied (the writer copies it into
    the file at once); anything else is converted by torch, GPU tensors included.
    """
    weight = weight.detach()
    if weight.device.type == "cpu" and weight.dtype == TORCH_DTYPES[dtype] != torch.bfloat16:
        arr = weight.numpy()  # numpy's reshape/transpose cost less than torch's dispatch here
        mat = arr.reshape(arr.shape[0], -1)
        return mat.T if view.transposed else mat
    with torch.no_grad():
        mat = view.matrix(weight.detach()).to("cpu", dtype=TORCH_DTYPES[dtype])
        if dtype == "bfloat16":
            return mat.contiguous().view(torch.int16).numpy().view(np.uint16)
        return mat.numpy()


def low_coverage_message(model_class: str, cov: Coverage) -> str:
    """The warning for a recording that holds less than half of the model's matrices."""
    largest = ", ".join(f"{name} ({kind}, {n:,})" for name, kind, n in cov.largest_unrecorded)
    return (
        f"Recording only {cov.recorded_params:,} of the {cov.eligible_2d_params:,} parameters "
        f"in >= 2-D tensors of {model_class} ({cov.share:.1%}): most of the model is NOT "
        f"recorded, so its numbers describe a minority of it. Largest unrecorded modules: "
        f"{largest or 'none'}. Teach the layer registry a module type with "
        "basis_stability.register_view(ModuleType, kind, handler) (see basis_stability.views), "
        "or select skipped layers of a known type with `types` or `include`; "
        "basis_stability.select_layers(model).describe_skipped() says why each was skipped."
    )


class Recorder:
    """Records snapshots of a model's layer matrices into one run file, and with each (unless
    ``biases=False``) the model's biases and other small state (:func:`plan_state`).

    Args:
        model: the model (DDP and ``torch.compile`` wrappers are unwrapped).
        path: the run file (``.h5``).
        config: a :class:`RecordConfig`; keyword arguments override its fields.
        mode: ``create`` (refuse an existing file), ``overwrite`` (replace it) or ``append``
            (resume after the last complete snapshot; creates the file if missing).
        keep: with ``append``, resume after the first ``keep`` snapshots instead (training was
            rolled back to a checkpoint taken then); the later ones are moved to a backup file
            beside the run, never deleted.
        resume_step: with ``keep``, the checkpoint's optimizer step: events logged after it
            (by the rolled-back training) are dropped too (default: the last kept snapshot's).
        live: values measured at every snapshot while recording, e.g.
            ``basis_stability.LiveStability(tensorboard="runs/tb")``: each layer's S against
            the snapshot before and the mean S, logged at the snapshot's step and kept for
            :meth:`live_metrics`. Measured on the writing rank, from the host copy of the
            snapshot, on the background writer thread (on the calling thread with
            ``background=False``); a failure there is warned of once and never stops the
            recording.

    Under torch.distributed only global rank 0 opens and writes the file; on other ranks every
    method is a cheap no-op, so the same code runs on all ranks. A model sharded by FSDP2
    (``torch.distributed.fsdp.fully_shard``, parameters as DTensors) is gathered one layer at a
    time onto rank 0 (its sharded biases too), so every rank must call :meth:`snapshot` (an
    attached schedule does); the whole model is never materialised on one rank. FSDP1
    (``FullyShardedDataParallel``) flattens its parameters and is refused with a clear message.

    With ``background=True`` (the default) a snapshot is copied into reused host buffers before
    :meth:`snapshot` returns (the gathers of a sharded model included, on the calling thread of
    every rank) and written by one background thread; :meth:`flush` and :meth:`close` wait for
    it, :meth:`log_event` is queued behind it, and a write that fails there (a full disk) is
    raised by the next :meth:`snapshot`, :meth:`log_event`, :meth:`flush` or :meth:`close`, with
    the writer's message. The buffers hold one host copy of the recorded tensors (on rank 0 when
    sharded), two while snapshots come faster than they are written; ``background=False``
    needs none.

    Raises:
        NoEligibleLayersError: no layer matched the selection.
        RunExistsError: ``mode="create"`` and the file exists.
        RunMismatchError: ``mode="append"`` and the run holds other layers or shapes, or other
            biases and buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        config: RecordConfig | None = None,
        *,
        mode: str = "create",
        keep: int | None = None,
        resume_step: int | None = None,
        live: LiveOption | None = None,
        **overrides: Any,
    ) -> None:
        check_live(live)
        if mode not in _MODES:
            raise ConfigError(
                expected(
                    "mode",
                    f"one of {', '.join(_MODES)}",
                    mode,
                    "Use append to continue an existing run.",
                )
            )
        path = as_path(path)
        check_config("config", config, RecordConfig)
        check_options(overrides, RecordConfig)
        self.config = RecordConfig(**{**asdict(config or RecordConfig()), **overrides})
        self.model = unwrap_model(model)
        refuse_fsdp1(self.model)
        self._select()
        self.path = path
        self.closed = False
        self.step = 0
        self._pending: dict[str, float] = {}
        self._hook = None
        self._schedule: Schedule | None = None
        self._metrics_fn: Callable[[], Mapping[str, float]] | None = None
        self._fired = 0
        self._steps_per_epoch: int | None = None
        self._sharded = any(
            is_dtensor(_resolve(self.model, name))
            for name in [v.param_name for v in self.views]
            + [k for k, _, _ in self.state_plan.entries]
        )
        self._writer = None
        self._thread: WriterThread | None = None  # the background writer (writing rank only)
        self._buffers = HostBuffers()
        self._slot = 0  # which of the (at most two) sets of buffers the next copy fills
        self._handed = 0  # snapshots handed to the background writer so far, counted in the run
        # live values (S at every snapshot) on the writing rank, from its initial snapshot on
        writes_live = live is not None and _dist.is_writer()
        self._live = LiveHook(live, self.views, path) if writes_live else None
        try:
            self._start(mode, keep, resume_step)
        except BaseException:
            if self._live is not None:
                self._live.close()
            raise

    def _start(self, mode: str, keep: int | None, resume_step: int | None) -> None:
        """Open the run (on the writing rank) with its initial snapshot, and the writer thread."""
        if self._sharded:
            self._open_sharded(mode, keep, resume_step)
            return
        self._writer = self._open(mode, keep, resume_step) if _dist.is_writer() else None
        self._start_background()

    def _select(self) -> None:
        """What to record: the selected layers, their share of the model, its small state
        (each skipped layer and entry logged with its reason; a low share warned of)."""
        self.selection: Selection = select_layers(
            self.model, self.config.include, self.config.exclude, self.config.types
        )
        for name, reason in self.selection.skipped:
            log.info("not recording %s: %s", name, reason)
        self.coverage: Coverage = measure_coverage(self.model, self.views)
        self.state_plan = plan_state(self.model, self.views)
        for key, reason in self.state_plan.skipped:
            log.info("not storing %s: %s", key, reason)
        # the stored state entries: the model's (biases=True) on create, the run's on append
        self._use_state(st.plan(self.state_plan.entries if self.config.biases else []))
        if self.coverage.share < _LOW_COVERAGE and _dist.is_writer():
            log.warning("%s", low_coverage_message(type(self.model).__name__, self.coverage))

    def _open_sharded(self, mode: str, keep: int | None, resume_step: int | None) -> None:
        """Open the run on rank 0 of a sharded model: every rank must learn whether rank 0
        opened the file (or why it could not), then join the gathers of the initial snapshot,
        or none does."""
        failure: BaseException | None = None
        if _dist.is_writer():
            try:
                self._writer = self._open(mode, keep, resume_step)
            except Exception as exc:  # re-raised below, on every rank
                failure = exc
        status = _dist.broadcast_object(
            ("failed", f"{type(failure).__name__}: {failure}")
            if failure is not None
            else ("ok", self._writer is not None and self._created, self._state)
        )
        if failure is not None:
            raise failure
        if status[0] == "failed":
            raise RunFileError(f"Rank 0 could not open {self.path} ({status[1]}).")
        self._use_state(status[2])  # the run's state entries: every rank joins their gathers
        self._start_background()
        if status[1] and self.config.initial:
            self.snapshot(step=0, epoch=0.0)
            self.flush()  # as unsharded: the run is open once its initial snapshot is in it

    def _start_background(self) -> None:
        if self._writer is not None and self.config.background:
            self._thread = WriterThread()

    @property
    def views(self) -> list[LayerView]:
        return self.selection.views

    @property
    def n_snapshots(self) -> int:
        """Snapshots in the file, the one the background writer is writing included (0 on ranks
        that do not write)."""
        if self._writer is None:
            return 0
        return max(self._writer.n_snapshots, self._handed)  # each may be ahead for a moment

    def _open(self, mode: str, keep: int | None = None, step: int | None = None):
        """The run's writer: an existing run resumed (``append``), else a new one created."""
        self._created = False
        if mode == "append" and self.path.exists():
            return self._resume(keep, step)
        return self._create(overwrite=mode == "overwrite")

    def _resume(self, keep: int | None, step: int | None):
        """Re-open the run, and follow what it stores: its state entries, its storage dtype,
        and the step of its last snapshot (the optimizer steps count on from there)."""
        from ..store.writer import RunWriter

        offered = st.plan(self.state_plan.entries).entries
        writer = RunWriter.resume(self.path, self.views, keep=keep, step=step, state=offered)
        self._follow_state(writer.state)
        if writer.storage_dtype != self.config.dtype:  # one run holds one storage dtype
            log.warning(
                "%s stores %s; appending in %s, not %s",
                self.path,
                writer.storage_dtype,
                writer.storage_dtype,
                self.config.dtype,
            )
            self.config = dataclasses.replace(self.config, dtype=writer.storage_dtype)
        self.step = max(writer.last_step or 0, 0)  # -1 (unknown) and no snapshot: 0
        log.info(
            "resuming %s after snapshot %d (step %d)", self.path, writer.n_snapshots - 1, self.step
        )
        return writer

    def _run_config(self) -> dict[str, Any]:
        """The ``config`` root attribute of a new run: the recording configuration (not
        ``background``: it changes when, not what, is written), the skipped layers, coverage."""
        cov = self.coverage
        return {
            **{k: v for k, v in asdict(self.config).items() if k != "background"},
            "skipped": self.selection.skipped,
            "coverage": {
                "recorded_params": cov.recorded_params,
                "eligible_2d_params": cov.eligible_2d_params,
                "largest_unrecorded": [list(entry) for entry in cov.largest_unrecorded],
            },
        }

    def _create(self, overwrite: bool):
        """A new run holding the initial snapshot (unless ``initial=False``; a sharded model's
        is taken by every rank together, after :meth:`_open_sharded`)."""
        from ..store.writer import RunWriter

        plan = self.state_plan
        state = st.plan(plan.entries if self.config.biases else [], plan.model, plan.tied)
        self._use_state(state)
        writer = RunWriter.create(
            self.path,
            self.views,
            model_class=type(self.model).__name__,
            storage_dtype=self.config.dtype,
            config=self._run_config(),
            force=overwrite,
            state=state,
        )
        self._created = True
        if self.config.initial and not self._sharded:
            self._write_initial(writer)
        return writer

    def _write_initial(self, writer) -> None:
        """The initial snapshot of a new run; when it fails (a full disk), no run is left."""
        try:
            self._write(writer, step=0, epoch=0.0, metrics={})
        except WriteFailedError as exc:  # e.g. a full disk: leave no run that holds nothing
            writer.close()
            self.path.unlink(missing_ok=True)
            cause = str(exc).split(" The run keeps")[0].split(" Nothing of it")[0]
            raise WriteFailedError(
                f"{cause} This was the initial snapshot of a new run, so no run file is "
                "left; free space or choose another path."
            ) from None

    def _follow_state(self, stored: st.StateIndex) -> None:
        """Append what the run stores: its state entries, whatever ``biases`` says."""
        if stored.entries and not self.config.biases:
            log.warning(
                "%s stores biases and buffers with every snapshot; appending them too "
                "(biases=False applies to new runs)",
                self.path,
            )
        elif not stored.entries and self.config.biases and self.state_plan.entries:
            log.warning(
                "%s stores no biases or buffers (recorded with biases=False, or before format "
                "1.3); appending the matrices only",
                self.path,
            )
        self._use_state(stored)

    def _use_state(self, index: st.StateIndex) -> None:
        """Store ``index``'s entries with every snapshot: per dtype, each entry with its key
        split at its dots (resolved anew at every snapshot: modules may be swapped meanwhile)."""
        self._state = index
        self._state_layout = [
            (dtype, [(entry, entry.key.split(".")) for entry in group])
            for dtype, group, _ in index.layout()
        ]

    # ------------------------------------------------------------------ snapshots
    def _state_rows(self, pack: Callable[[list[torch.Tensor], str], np.ndarray] = state_storage):
        """One packed row per state dtype (the run's layout), captured with the matrices."""
        for dtype, group in self._state_layout:
            parts = []
            with torch.no_grad():
                for entry, path in group:
                    value = self._state_tensor(entry, path)
                    if self._sharded and is_dtensor(value):
                        value = gather_to_rank0(value)  # a collective: every rank runs this
                        if value is None:
                            continue
                    parts.append(value if value.dim() == 1 else value.reshape(1))
            if _dist.is_writer():
                yield pack(parts, dtype)

    def _state_tensor(self, entry: st.StateEntry, path: Sequence[str]) -> torch.Tensor:
        value = resolve_or_none(self.model, path)
        if (
            not isinstance(value, torch.Tensor)
            or value.shape != entry.shape
            or value.dtype != STATE_TORCH[entry.dtype]
        ):
            got = (
                f"{STATE_NAMES.get(value.dtype, value.dtype)} {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ConfigError(
                expected(
                    f"model.{entry.key}",
                    f"a {entry.dtype} tensor of shape {entry.shape}, as the run stores it",
                    got,
                    "The model changed since the run began; record into a new run file.",
                )
            )
        return value

    def _weights(self):
        """``(view, weight)`` of each recorded layer, one at a time: a sharded weight gathered to
        rank 0 (None on the other ranks)."""
        for view in self.views:  # one layer at a time: never a whole state_dict copy
            weight = _resolve(self.model, view.param_name)
            if self._sharded and is_dtensor(weight):
                weight = gather_to_rank0(weight)  # a collective: every rank runs this loop
            yield view, weight

    def _matrices(self):
        for view, weight in self._weights():
            yield None if weight is None else to_storage(view, weight, self.config.dtype)

    def _write(self, writer, *, step: int, epoch: float, metrics: Mapping[str, float]) -> int:
        state = self._state_rows() if self._state.entries else None
        # one layer at a time, unless live values need every matrix once the snapshot is in
        matrices = self._matrices() if self._live is None else list(self._matrices())
        index = writer.append(matrices, step=step, epoch=epoch, metrics=metrics, state=state)
        if self._live is not None:
            start = time.perf_counter()
            self._live.observe(_live_step(step, index), matrices, self.config.dtype)
            self._live.waited(time.perf_counter() - start)
        return index

    def _append(self, matrices: list[np.ndarray], *, step: int, **snapshot: Any) -> None:
        """The background writer's operation: write and commit a snapshot, then measure it
        for the live values (from the same host buffers, before the next snapshot reuses them)."""
        index = self._writer.append(matrices, step=step, **snapshot)
        if self._live is not None:
            self._live.observe(_live_step(step, index), matrices, self.config.dtype)

    def _copy_matrices(self) -> list[np.ndarray]:
        """Every recorded matrix copied into its host buffer, in the storage dtype."""
        dtype = TORCH_DTYPES[self.config.dtype]
        copies, wrong = [], None
        with torch.no_grad():
            for i, (view, weight) in enumerate(self._weights()):  # every rank joins the gathers
                on_host = weight.device.type == "cpu" and weight.dtype == dtype != torch.bfloat16
                # a CPU weight in the storage dtype: a numpy view of it, copied by numpy
                mat = (
                    to_storage(view, weight, self.config.dtype) if on_host else view.matrix(weight)
                )
                if tuple(mat.shape) != view.shape:
                    wrong = wrong or (view, tuple(mat.shape))
                elif on_host:
                    copies.append(self._buffers.copy_array((self._slot, i), mat))
                else:
                    copies.append(self._buffers.copy((self._slot, i), mat.detach(), dtype))
        if wrong is not None:  # raised after the loop: the other ranks finished their gathers
            raise ConfigError(
                f"Expected layer {wrong[0].name} to be a {wrong[0].shape} matrix but got "
                f"{wrong[1]}. The model changed shape since the run began."
            )
        return copies

    def _copy_state(self, parts: list[torch.Tensor], dtype: str) -> np.ndarray:
        with torch.no_grad():
            return self._buffers.pack((self._slot, dtype), parts, STATE_TORCH[dtype])

    def _hand_off(self, *, step: int, epoch: float, metrics: Mapping[str, float]) -> int:
        """Copy a snapshot into the host buffers and queue its write; returns its index.

        It is handed over once the write before it is committed: a snapshot taken while that
        write goes on is copied meanwhile into a second set of buffers (allocated the first time
        that happens). Every check the writer makes before writing (a stopped writer, a full
        disk, bad metrics) is made here, once this rank has joined every gather, so that these
        errors come from this call.
        """
        if self._thread.busy:  # the write in flight reads one set: copy into the other meanwhile
            self._slot = 1 - self._slot
        try:
            matrices = self._copy_matrices()  # the gathers of a sharded model: every rank
            state = list(self._state_rows(self._copy_state)) if self._state.entries else None
            self._buffers.ready()  # the copies are complete: the caller may change the weights
        finally:
            measuring, start = self._live is not None and self._thread.busy, time.perf_counter()
            self._wait()  # the snapshot before is committed, or its failure raised (over any other)
            if measuring:  # the part of the wait its live measurement took
                self._live.waited(min(time.perf_counter() - start, self._live.last))
        self._writer.check_ready()
        values = check_metrics(metrics)
        index = self._writer.n_snapshots
        self._thread.submit(
            self._append, matrices, step=step, epoch=epoch, metrics=values, state=state
        )
        self._handed = index + 1
        return index

    def _wait(self, block: bool = True) -> None:
        """Wait for the background writer (``block=False``: only look whether an operation
        already failed) and re-raise its failure, once."""
        try:
            if block:
                self._thread.wait()
            else:
                self._thread.check()
        except BaseException as exc:
            if isinstance(exc, Exception):  # a failed snapshot is not in the run
                self._handed = self._writer.n_snapshots
            raise
        if block:
            self._handed = self._writer.n_snapshots

    def snapshot(
        self,
        *,
        epoch: float | None = None,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> int | None:
        """Write one snapshot of every selected layer and commit it (flushed to disk).

        With ``background=True`` (the default) this copies the snapshot and returns while a
        background thread writes and commits it; the copy is complete on return, so the weights
        may change at once. It first waits for the snapshot written before, if that is still
        being written.

        Args:
            epoch: the epoch the weights belong to (e.g. ``epoch + 1`` after training epoch
                ``epoch``); NaN when not given and no schedule can tell.
            step: the optimizer step; defaults to the steps counted by :meth:`attach` (or -1).
            metrics: scalar metrics to store with this snapshot (plus any from :meth:`log`).

        Returns:
            The index of the new snapshot, or None on a rank that does not write.

        Raises:
            WriteFailedError: the disk has no room for this snapshot, or the background write
                of an earlier snapshot or event failed (that snapshot is not in the run, which
                keeps every snapshot committed before it).
        """
        self._check_open("snapshot()")
        if self._live is not None:
            self._live.report()  # a failure of the live values, warned of once
        if step is None:
            step = self.step if self._hook is not None else -1
        step = check_step(step)
        if epoch is None:
            epoch = self._epoch_of(step)
        merged = {**self._pending, **(metrics or {})}
        self._pending.clear()
        if self._writer is None:
            if self._sharded:
                for _ in self._matrices():  # join rank 0's gathers, one layer at a time
                    pass
                for _ in self._state_rows():  # then its gathers of sharded biases
                    pass
            return None
        if self._thread is not None:
            return self._hand_off(step=step, epoch=float(epoch), metrics=merged)
        return self._write(self._writer, step=step, epoch=float(epoch), metrics=merged)

    def live_metrics(self, wait: bool = False) -> list[LiveValues]:
        """The live values (``live=``) of the snapshots measured since the last call, oldest
        first, as ``(step, {tag: value})``; also after :meth:`close`.

        With ``live=LiveStability(...)`` these are ``stability/S/<layer>`` (S against the
        snapshot before) and ``stability/S_mean``; the first snapshot of a recording has none.
        ``wait=True`` first waits for the snapshots handed to the background writer
        (:meth:`flush`). Empty without ``live`` and on ranks that do not write.
        """
        if wait:
            self.flush()
        return self._live.take() if self._live is not None else []

    def flush(self) -> None:
        """Wait until every snapshot and event given so far is committed and flushed to disk.

        Nothing to wait for with ``background=False``, on ranks that do not write, or after
        :meth:`close`.

        Raises:
            WriteFailedError: a background write failed (raised once, here or by the next call).
        """
        if self._thread is not None and not self.closed:
            self._wait()

    def _check_open(self, method: str) -> None:
        if self.closed:
            raise RunFileError(
                f"The recorder for {self.path} is closed; call {method} before close() (or the "
                "end of its `with` block), or open a new Recorder(..., mode='append') to add "
                "more to the run."
            )

    def _epoch_of(self, step: int) -> float:
        if self._steps_per_epoch and step >= 0:
            return step / self._steps_per_epoch
        return self._schedule.epoch_of(step) if self._schedule else math.nan

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Store one decision (a JSON-able dict, e.g. from the OIALR controller) in the run's
        ``/events``; flushed at once. A no-op on ranks that do not write.

        With ``background=True`` the event is encoded now and written by the background
        writer after the snapshots given before it, in order.
        """
        self._check_open("log_event()")
        if self._writer is None:
            return
        if not self._writer.has_events:
            log.warning(
                "%s predates format 1.1 and has no /events; event not stored: %s", self.path, event
            )
        elif self._thread is not None:
            self._wait(block=False)  # a background failure already known is raised here
            self._thread.submit(self._writer.write_event, encode_event(event))
        else:
            self._writer.log_event(event)

    def log(self, **metrics: float) -> None:
        """Remember metrics for the next snapshot (useful with :meth:`attach`).

        Metrics still pending at :meth:`close` are dropped with a ``RuntimeWarning``.
        """
        self._check_open("log()")
        self._pending.update({k: float(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------ schedules
    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        metrics_fn: Callable[[], Mapping[str, float]] | None = None,
        steps_per_epoch: int | None = None,
    ) -> Recorder:
        """Snapshot by itself after the optimizer steps that ``schedule`` selects.

        Args:
            optimizer: the optimizer whose ``step()`` drives the schedule.
            schedule: e.g. ``every(10)``, ``at([1, 5, 50])``, ``logspaced(1, 5000, 30)``,
                ``every_epoch(len(loader))``.
            metrics_fn: called at each scheduled snapshot for metrics to store with it.
            steps_per_epoch: when given, snapshots are stamped with the fractional epoch
                ``step / steps_per_epoch``.

        Returns:
            ``self``, so that ``rec = Recorder(...).attach(opt, every(10))`` reads naturally.
        """
        if not isinstance(schedule, Schedule):
            raise ConfigError(
                expected(
                    "schedule",
                    "a Schedule such as every(10)",
                    schedule,
                    "Import schedules from basis_stability.recording.",
                )
            )
        if self._hook is not None:
            self._hook.remove()
        self._schedule, self._metrics_fn = schedule, metrics_fn
        self._steps_per_epoch = steps_per_epoch
        self._hook = optimizer.register_step_post_hook(self._on_step)
        return self

    def _on_step(self, *_: Any) -> None:
        self.step += 1
        if self._schedule is not None and self._schedule(self.step):
            self._fired += 1
            extra = self._metrics_fn() if self._metrics_fn else None
            self.snapshot(step=self.step, metrics=extra)

    def close(self) -> None:
        """Wait for the background writer, then flush and close the file (idempotent).

        Warns (``RuntimeWarning``) if an attached schedule never fired, or if metrics given to
        :meth:`log` after the last snapshot are left over: they belong to no snapshot.

        Raises:
            WriteFailedError: a background write failed and no call raised it yet; the file is
                closed all the same, and a second ``close()`` does nothing.
        """
        if self.closed:
            return
        self.closed = True
        if self._pending:
            warnings.warn(
                f"The recorder for {self.path} drops the metrics "
                f"{', '.join(sorted(self._pending))}, logged after the last snapshot: "
                "rec.log() keeps metrics for the next snapshot, and none came. Take a final "
                "rec.snapshot() before closing to store them.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._pending.clear()
        if self._hook is not None:
            self._hook.remove()
            if self._fired == 0:
                warnings.warn(
                    f"The recorder for {self.path} was attached to an optimizer but its schedule "
                    f"{self._schedule} never fired ({self.step} optimizer steps seen); nothing was "
                    "recorded after the initial weights. Check that optimizer.step() runs and "
                    "that the schedule's steps are within training.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._hook = None
        try:
            if self._thread is not None:
                self._wait()
        finally:
            if self._thread is not None:
                self._thread.close()
            if self._writer is not None:
                self._writer.close()
            if self._live is not None:
                self._live.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _live_step(step: int, index: int) -> int:
    """The x of a snapshot's live values: its optimizer step, or its index when the step is
    unknown (-1: ``snapshot()`` without a step or a schedule), so the values never pile up at
    one step."""
    return step if step >= 0 else index
