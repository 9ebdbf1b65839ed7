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
"""

from __future__ import annotations

import logging
import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _dist
from ..errors import ConfigError, RunFileError, WriteFailedError, expected
from ..store import state as st
from ..store.writer import check_metrics, encode_event
from ..views import Coverage, LayerView, Selection, measure_coverage, select_layers, unwrap_model
from .background import HostBuffers, WriterThread
from .schedules import Schedule

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODES = ("create", "overwrite", "append")
_LOW_COVERAGE = 0.5  # warn when the recorded matrices hold less than this share


@dataclass
class RecordConfig:
    """What to record and how.

    Attributes:
        include: name patterns a layer must match (globs, or ``re:`` regular expressions).
        exclude: name patterns that drop a layer.
        types: layer kinds to keep (``linear``, ``conv*``, ``mha``, ``embedding``, ...).
        dtype: storage dtype, ``float32`` (exact, default), ``float16`` or ``bfloat16``.
        initial: take a snapshot of the initial weights (step 0, epoch 0) when a run is created.
        metadata: free-form JSON-able facts about the run (hyper-parameters, dataset, ...).
        biases: also store, with every snapshot, the biases and the other small non-matrix
            state: 1-D parameters such as LayerNorm/BatchNorm weights, and buffers such as
            running statistics (every 0-D or 1-D ``state_dict()`` entry that is not a recorded
            matrix), exactly, in their own dtype. With the matrices, that makes an exported
            snapshot a complete state dict. False (``bstab record --no-biases``): matrices only.
        background: write snapshots on a background thread. :meth:`Recorder.snapshot` copies
            the weights into host buffers kept for the purpose (pinned for CUDA weights: one
            extra host copy of the recorded tensors, two while snapshots come faster than they
            are written) and returns; the thread writes, flushes and commits, one snapshot at
            a time. A SIGKILL loses at most the snapshot being
            written; a failed write is raised by the recorder's next call. False (``bstab
            record --no-background``): each snapshot is committed before ``snapshot()``
            returns. Not stored in the run: it changes when, not what, is written.
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    types: Sequence[str] | None = None
    dtype: str = "float32"
    initial: bool = True
    metadata: Mapping[str, Any] = field(default_factory=dict)
    biases: bool = True
    background: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.background, (bool, np.bool_)):
            raise ConfigError(
                expected(
                    "background",
                    "True or False",
                    self.background,
                    "False writes each snapshot before snapshot() returns.",
                )
            )
        if self.dtype not in _TORCH_DTYPES:
            raise ConfigError(
                expected(
                    "dtype",
                    f"one of {', '.join(_TORCH_DTYPES)}",
                    self.dtype,
                    "float32 is exact; the others halve the file.",
                )
            )


def _check_step(step: Any) -> int:
    """An optimizer step: an integer >= 0 (a Python, numpy or one-element torch integer), or -1
    for unknown. Floats (even 2.0) and bools are refused: a step rounded silently is a wrong step.
    """
    wanted = "an integer optimizer step >= 0 (or -1 for unknown)"
    if isinstance(step, (bool, np.bool_)) or (
        isinstance(step, torch.Tensor) and step.dtype == torch.bool
    ):
        raise ConfigError(expected("step", wanted, step, "Pass the step count, e.g. step=10."))
    try:
        value = operator.index(step)  # int, numpy integers, integer tensors of one element
    except TypeError:
        raise ConfigError(
            expected("step", wanted, step, "Pass an int, e.g. step=int(global_step).")
        ) from None
    if value < -1 or value >= 2**63:  # the run file stores steps as int64
        raise ConfigError(expected("step", wanted, value, "Use -1 when the step is unknown."))
    return value


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
    if weight.device.type == "cpu" and weight.dtype == _TORCH_DTYPES[dtype] != torch.bfloat16:
        arr = weight.numpy()  # numpy's reshape/transpose cost less than torch's dispatch here
        mat = arr.reshape(arr.shape[0], -1)
        return mat.T if view.transposed else mat
    with torch.no_grad():
        mat = view.matrix(weight.detach()).to("cpu", dtype=_TORCH_DTYPES[dtype])
        if dtype == "bfloat16":
            return mat.contiguous().view(torch.int16).numpy().view(np.uint16)
        return mat.numpy()


_STATE_TORCH = {name: getattr(torch, name) for name in st.DTYPES}  # "float32" -> torch.float32
_STATE_NAMES = {dtype: name for name, dtype in _STATE_TORCH.items()}


@dataclass
class StatePlan:
    """What a snapshot of a model stores besides its matrices (see :func:`plan_state`).

    Attributes:
        entries: ``(key, dtype, shape)`` of every small entry: 0-D or 1-D, not a recorded matrix.
        model: every key of the model's ``state_dict()`` with its shape and dtype.
        tied: keys whose tensor is another key's (a head tied to an embedding) -> that key.
        skipped: ``(key, reason)`` of small entries that cannot be stored.
    """

    entries: list[tuple[str, str, tuple[int, ...]]]
    model: list[st.ModelKey]
    tied: dict[str, str]
    skipped: list[tuple[str, str]]


def plan_state(model: nn.Module, views: Sequence[LayerView]) -> StatePlan:
    """The small state of ``model`` (bare, unwrapped) that a snapshot stores with ``views``.

    Every ``state_dict()`` entry that is 0-D or 1-D (biases, norm weights, running statistics,
    ``num_batches_tracked``) and not a recorded matrix; larger unrecorded tensors (an unselected
    embedding) are not stored, and an export names them as missing.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> [key for key, _, _ in plan_state(m, select_layers(m).views).entries]
        ['0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']
    """
    sd = model.state_dict(keep_vars=True)  # the tensors themselves: ties keep their identity
    recorded = {v.param_name for v in views}
    owner: dict[int, str] = {}  # id(tensor) -> the key it is stored under
    for key in [k for k in sd if k in recorded] + list(sd):
        if isinstance(sd[key], torch.Tensor):
            owner.setdefault(id(sd[key]), key)
    plan = StatePlan([], [], {}, [])
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            plan.model.append(st.ModelKey(key, None, type(value).__name__))
            plan.skipped.append((key, f"not a tensor ({type(value).__name__})"))
            continue
        dtype = _STATE_NAMES.get(value.dtype, str(value.dtype).removeprefix("torch."))
        plan.model.append(st.ModelKey(key, tuple(value.shape), dtype))
        if owner[id(value)] != key:
            plan.tied[key] = owner[id(value)]
        elif key in recorded or value.dim() > 1:
            continue
        elif value.numel() == 0:
            plan.skipped.append((key, "empty (an export recreates it from its shape)"))
        elif value.dtype not in _STATE_NAMES:
            plan.skipped.append((key, f"dtype {dtype} cannot be stored"))
        elif _resolve_or_none(model, key.split(".")) is not value:
            plan.skipped.append((key, "not an attribute of its module (a state-dict hook?)"))
        else:
            plan.entries.append((key, dtype, tuple(value.shape)))
    return plan


def _resolve_or_none(model: nn.Module, parts: Sequence[str]) -> Any:
    """``model.<parts...>`` (a state-dict key split at its dots), or None. Reads the modules'
    own tables first: five times faster than ``getattr`` through ``nn.Module.__getattr__``, which
    counts at hundreds of entries per snapshot."""
    obj: Any = model
    try:
        for part in parts[:-1]:
            children = getattr(obj, "_modules", None)
            obj = (
                children[part] if children is not None and part in children else getattr(obj, part)
            )
        last = parts[-1]
        for table in ("_parameters", "_buffers"):
            own = getattr(obj, table, None)
            if own is not None and last in own:
                return own[last]
        return getattr(obj, last)
    except AttributeError:
        return None


def state_storage(parts: Sequence[torch.Tensor], dtype: str) -> np.ndarray:
    """One dtype's packed state row in host memory, bit for bit (bfloat16 as uint16 bits, bool
    as uint8); GPU tensors are concatenated there and copied once."""
    with torch.no_grad():
        flat = torch.cat(list(parts)) if len(parts) > 1 else parts[0].detach().reshape(-1)
        flat = flat.to("cpu")
        if dtype == "bfloat16":
            return flat.view(torch.int16).numpy().view(np.uint16)
        if dtype == "bool":
            return flat.view(torch.uint8).numpy()
        return flat.numpy()


def _is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def _refuse_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "Expected a model whose layers keep their own weights but got one wrapped in "
            "FullyShardedDataParallel (FSDP1), whose flat parameters hold no layer matrices. "
            "Shard with torch.distributed.fsdp.fully_shard (FSDP2) instead: the recorder "
            "gathers its layers one at a time onto rank 0."
        )


def gather_to_rank0(weight: Any) -> torch.Tensor | None:
    """The full value of a sharded (DTensor) parameter on global rank 0, None on other ranks.

    A parameter sharded along dim 0 over a 1-D mesh (FSDP2's layout) is gathered to rank 0 only:
    each rank sends its shard, padded to a common size, and only rank 0 holds the full matrix.
    Other layouts fall back to ``full_tensor()`` (an all-gather: every rank holds this one layer
    for a moment). Every rank of the mesh must call this.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    local = weight.to_local().detach()
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        full = weight.full_tensor().detach()
        return full if _dist.is_writer() else None
    group = mesh.get_group()
    size = dist.get_world_size(group)
    rows = weight.shape[0]
    chunk = -(-rows // size)  # torch.chunk's split: ceil(rows / size) rows per rank
    padded = local.new_zeros((chunk, *weight.shape[1:]))
    padded[: local.shape[0]] = local
    dst = dist.get_global_rank(group, 0)
    gathered = [torch.empty_like(padded) for _ in range(size)] if _dist.rank() == dst else None
    dist.gather(padded, gathered, dst=dst, group=group)
    if _dist.rank() != dst:
        return None
    return torch.cat(gathered)[:rows]


def low_coverage_message(model_class: str, cov: Coverage) -> str:
    """The warning for a recording that holds less than half of the model's matrices."""
    largest = ", ".join(f"{name} ({kind}, {n:,})" for name, kind, n in cov.largest_unrecorded)
    return (
        f"Recording only {cov.recorded_params:,} of the {cov.eligible_2d_params:,} parameters "
        f"in >= 2-D tensors of {model_class} ({cov.share:.1%}): most of the model is NOT "
        f"recorded, so its numbers describe a minority of it. Largest unrecorded modules: "
        f"{largest or 'none'}. Teach the layer registry a module type with "
        "basis_stability.register_view(ModuleType, kind, handler) (see basis_stability.views), "
        "or select skipped layers of a known type with `types`/`include`; "
        "`bstab record --list` shows every layer and why it is skipped."
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
        **overrides: Any,
    ) -> None:
        if mode not in _MODES:
            raise ConfigError(
                expected(
                    "mode",
                    f"one of {', '.join(_MODES)}",
                    mode,
                    "Use append to continue an existing run.",
                )
            )
        self.config = RecordConfig(**{**asdict(config or RecordConfig()), **overrides})
        self.model = unwrap_model(model)
        _refuse_fsdp1(self.model)
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
        self.path = Path(path)
        self.closed = False
        self.step = 0
        self._pending: dict[str, float] = {}
        self._hook = None
        self._schedule: Schedule | None = None
        self._metrics_fn: Callable[[], Mapping[str, float]] | None = None
        self._fired = 0
        self._steps_per_epoch: int | None = None
        self._sharded = any(
            _is_dtensor(_resolve(self.model, name))
            for name in [v.param_name for v in self.views]
            + [k for k, _, _ in self.state_plan.entries]
        )
        self._writer = None
        self._thread: WriterThread | None = None  # the background writer (writing rank only)
        self._buffers = HostBuffers()
        self._slot = 0  # which of the (at most two) sets of buffers the next copy fills
        self._handed = 0  # snapshots handed to the background writer so far, counted in the run
        if not self._sharded:
            self._writer = self._open(mode, keep, resume_step) if _dist.is_writer() else None
            self._start_background()
            return
        # sharded: every rank must learn whether rank 0 opened the file (or why it could not),
        # then join the gathers of the initial snapshot, or none does
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
        from ..store.writer import RunWriter

        self._created = False
        if mode == "append" and self.path.exists():
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
                self.config.dtype = writer.storage_dtype
            steps = writer._index["step"][-1:] if writer.n_snapshots else []
            self.step = max(int(steps[0]), 0) if len(steps) else 0
            log.info(
                "resuming %s after snapshot %d (step %d)",
                self.path,
                writer.n_snapshots - 1,
                self.step,
            )
            return writer
        cov = self.coverage
        plan = self.state_plan
        state = st.plan(plan.entries if self.config.biases else [], plan.model, plan.tied)
        self._use_state(state)
        cfg = {
            **{k: v for k, v in asdict(self.config).items() if k != "background"},
            "skipped": self.selection.skipped,
            "coverage": {
                "recorded_params": cov.recorded_params,
                "eligible_2d_params": cov.eligible_2d_params,
                "largest_unrecorded": [list(entry) for entry in cov.largest_unrecorded],
            },
        }
        writer = RunWriter.create(
            self.path,
            self.views,
            model_class=type(self.model).__name__,
            storage_dtype=self.config.dtype,
            config=cfg,
            force=mode == "overwrite",
            state=state,
        )
        self._created = True
        if self.config.initial and not self._sharded:
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
        return writer

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
                    if self._sharded and _is_dtensor(value):
                        value = gather_to_rank0(value)  # a collective: every rank runs this
                        if value is None:
                            continue
                    parts.append(value if value.dim() == 1 else value.reshape(1))
            if _dist.is_writer():
                yield pack(parts, dtype)

    def _state_tensor(self, entry: st.StateEntry, path: Sequence[str]) -> torch.Tensor:
        value = _resolve_or_none(self.model, path)
        if (
            not isinstance(value, torch.Tensor)
            or value.shape != entry.shape
            or value.dtype != _STATE_TORCH[entry.dtype]
        ):
            got = (
                f"{_STATE_NAMES.get(value.dtype, value.dtype)} {tuple(value.shape)}"
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
            if self._sharded and _is_dtensor(weight):
                weight = gather_to_rank0(weight)  # a collective: every rank runs this loop
            yield view, weight

    def _matrices(self):
        for view, weight in self._weights():
            yield None if weight is None else to_storage(view, weight, self.config.dtype)

    def _write(self, writer, *, step: int, epoch: float, metrics: Mapping[str, float]) -> int:
        state = self._state_rows() if self._state.entries else None
        return writer.append(self._matrices(), step=step, epoch=epoch, metrics=metrics, state=state)

    def _copy_matrices(self) -> list[np.ndarray]:
        """Every recorded matrix copied into its host buffer, in the storage dtype."""
        dtype = _TORCH_DTYPES[self.config.dtype]
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
            return self._buffers.pack((self._slot, dtype), parts, _STATE_TORCH[dtype])

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
            self._wait()  # the snapshot before is committed, or its failure raised (over any other)
        self._writer.check_ready()
        values = check_metrics(metrics)
        index = self._writer.n_snapshots
        self._thread.submit(
            self._writer.append, matrices, step=step, epoch=epoch, metrics=values, state=state
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
        if step is None:
            step = self.step if self._hook is not None else -1
        step = _check_step(step)
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
                    "Import schedules from basis_stability.record.",
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

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
