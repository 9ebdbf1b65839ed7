"""Turn checkpoints a user already has into a run, without retraining.

Each checkpoint is a state dict in a ``.pt``/``.pth``/``.bin`` file (loaded with
``weights_only=True``, memory-mapped when it is in torch's zip format; a dict that nests it under
``state_dict``, ``model`` or ``model_state_dict`` works too) or a ``.safetensors`` file.

Each file's epoch and step come from its name (``epoch=3-step=120.ckpt``, ``epoch_3``,
``ep3``, ``global_step=120``, any case), else from the checkpoint's own ``epoch``,
``global_step`` or ``step`` keys, else they are unknown (epoch NaN, step -1); never a guess from
some other number in the name. Files are written in step order when every step is known, else
in epoch order when every epoch is, else in natural name order (``epoch_2`` before ``epoch_10``).
Every file is checked for the same keys and shapes *before* anything is written, and tensors are
read one at a time.
"""

from __future__ import annotations

import glob
import math
import re
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..views import LayerView, Selection, select_state_dict, strip_wrapper_prefix
from .config import RecordConfig
from .recorder import to_storage

_NESTED = ("state_dict", "model_state_dict", "model")
_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_STEP_KEYS = ("step", "global_step")
_POSITION_KEYS = ("epoch", *_STEP_KEYS)
_STEP_LIMIT = 2**63  # the run file stores steps as int64

# "epoch" (or "ep") and "step" as words of their own (so "step" is no "ep", "deep3" no epoch),
# then optional separators (=, _, -, space) and the number
_EPOCH_IN_NAME = re.compile(r"(?<![a-z])(?:epochs?|ep)[\s_=\-]*(\d+(?:\.\d+)?)(?![\d.]*\d)", re.I)
_STEP_IN_NAME = re.compile(r"(?<![a-z])(?:global[_\-]?)?steps?[\s_=\-]*(\d+)(?!\.?\d)", re.I)


def natural_key(path: Path) -> tuple:
    """Sort key that orders ``epoch_2`` before ``epoch_10``."""
    return tuple(int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name))


def position_from_name(name: str) -> tuple[float | None, int | None]:
    """The epoch and step a checkpoint's file name states, None where it states none.

    Example:
        >>> position_from_name("epoch=1-step=23.ckpt")
        (1.0, 23)
        >>> position_from_name("ckpt-epoch1-acc0.91.pt")
        (1.0, None)
        >>> position_from_name("model_final_7.pt")
        (None, None)
    """
    stem = Path(name).stem
    epoch, step = _EPOCH_IN_NAME.search(stem), _STEP_IN_NAME.search(stem)
    return (
        float(epoch.group(1)) if epoch else None,
        int(step.group(1)) if step else None,
    )


def find_checkpoints(pattern: str) -> list[Path]:
    """The files matching a glob, in natural order.

    Raises:
        CheckpointError: nothing matched, or a match is not a checkpoint file.
    """
    paths = sorted((Path(p) for p in glob.glob(pattern, recursive=True)), key=natural_key)
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise CheckpointError(
            f"Expected `pattern` to match checkpoint files but {pattern!r} matched nothing. "
            "Quote the glob so the shell does not expand it, and check the folder.",
            argument="pattern",
        )
    wrong = [p.name for p in paths if p.suffix not in _SUFFIXES]
    if wrong:
        raise CheckpointError(
            f"Expected checkpoint files ({', '.join(_SUFFIXES)}) but "
            f"{pattern!r} also matched {', '.join(wrong[:5])}. Narrow the glob."
        )
    return paths


@dataclass
class Checkpoint:
    """One opened checkpoint: tensor shapes, lazy tensor access and scalar extras.

    ``scalars`` holds the numeric top-level entries (metrics such as ``loss``); ``epoch`` and
    ``step`` are the checkpoint's own, checked ``epoch`` and ``step``/``global_step`` entries
    (None when it has none).
    """

    path: Path
    shapes: dict[str, tuple[int, ...]]
    scalars: dict[str, float] = field(default_factory=dict)
    _tensors: Mapping[str, torch.Tensor] | None = None
    _safe: object | None = None
    epoch: float | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        # keys without DDP/compile prefixes -> keys in the file
        self._keys = {strip_wrapper_prefix(k): k for k in self.shapes}
        self.shapes = {strip_wrapper_prefix(k): s for k, s in self.shapes.items()}

    def tensor(self, key: str) -> torch.Tensor:
        key = self._keys[key]
        if self._safe is not None:
            return self._safe.get_tensor(key)
        return self._tensors[key]


def _bad_position(path: Path, key: str, value: Any, wanted: str) -> CheckpointError:
    return CheckpointError(
        f"Expected `{key}` in {path} to be {wanted} but got {value!r}. Fix the value the "
        f"training script saves, or drop the key and name the file like epoch_3.pt."
    )


def _position_value(path: Path, key: str, value: Any) -> float | int | None:
    """A checkpoint's own epoch (a finite number >= 0) or step (an integer in [0, 2**63))."""
    if value is None:
        return None
    is_step = key in _STEP_KEYS
    wanted = "an integer step >= 0" if is_step else "a finite epoch >= 0"
    one = (isinstance(value, torch.Tensor) and value.numel() == 1) or (
        isinstance(value, (np.ndarray, np.generic)) and value.size == 1
    )
    if one:  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_position(path, key, value, wanted)
    if not math.isfinite(value) or value < 0:
        raise _bad_position(path, key, value, wanted)
    if not is_step:
        return float(value)
    if value != int(value) or value >= _STEP_LIMIT:  # 1.5, or 1e30 (beyond int64)
        raise _bad_position(path, key, value, f"{wanted} and < 2**63")
    return int(value)


def _unnest(obj: object, path: Path) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save "
            "`model.state_dict()` (not the model object)."
        )
    state = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), obj)
    # in a flat state dict a tensor named "step" is a buffer of the model, not the position
    position = {
        k: _position_value(path, k, obj[k])
        for k in _POSITION_KEYS
        if k in obj and not (state is obj and isinstance(obj[k], torch.Tensor))
    }
    steps = [position[k] for k in _STEP_KEYS if position.get(k) is not None]
    scalars = {
        k: float(v)
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _POSITION_KEYS
    }
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return Checkpoint(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        scalars,
        tensors,
        epoch=position.get("epoch"),
        step=steps[0] if steps else None,
    )


def _unreadable(path: Path, reason: str, fix: str) -> CheckpointError:
    kind = "safetensors file" if path.suffix == ".safetensors" else "torch checkpoint"
    return CheckpointError(f"{path} is not a {kind} we can read: {reason}; re-save it with {fix}.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:160] if text else "") or type(exc).__name__


def _load_pt(path: Path) -> object:
    """torch.load with ``weights_only``: memory-mapped for the zip format, read whole for the
    legacy (pre-1.6 or ``_use_new_zipfile_serialization=False``) one, which cannot be mapped."""
    fix = "torch.save(state_dict, path)"
    if path.stat().st_size == 0:
        raise _unreadable(path, "it is empty (0 bytes)", fix)
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch raises many types for unreadable files
        if "Weights only load failed" in str(exc):
            reason = (
                "it pickles objects other than tensors and plain containers (a whole model?), "
                "which loading with weights_only=True refuses"
            )
            fix = "torch.save(model.state_dict(), path)"
        elif is_zip:
            reason = f"a damaged zip archive ({_first_line(exc).split('. ')[0]})"
        else:  # what torch says about a non-pickle (a KeyError, "invalid load key") tells nothing
            reason = (
                "neither torch's zip format nor its legacy pickle format (damaged, truncated "
                "or another kind of file)"
            )
        raise _unreadable(path, reason, fix) from None


@contextmanager
def open_checkpoint(path: Path) -> Iterator[Checkpoint]:
    """Open one checkpoint for lazy reading.

    Raises:
        CheckpointError: the file cannot be read (empty, damaged, not a checkpoint), or its own
            ``epoch``/``step``/``global_step`` entries are not valid.
    """
    if path.suffix != ".safetensors":
        yield _unnest(_load_pt(path), path)
        return
    from safetensors import safe_open

    fix = "safetensors.torch.save_file(state_dict, path)"
    if path.stat().st_size == 0:
        raise _unreadable(path, "it is empty (0 bytes)", fix)
    try:
        safe = safe_open(str(path), framework="pt")
        shapes = {k: tuple(safe.get_slice(k).get_shape()) for k in safe.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for unreadable files
        reason = _first_line(exc).replace("Error while deserializing header: ", "its header: ")
        raise _unreadable(path, reason, fix) from None
    with safe:  # yield outside the try: errors of the caller's block are not "cannot read"
        yield Checkpoint(path, shapes, _safe=safe)


def _check_same(first: Checkpoint, other: Checkpoint, views: list[LayerView]) -> None:
    want = {v.param_name: v.orig_shape for v in views}
    have = {k: other.shapes[k] for k in want if k in other.shapes}
    missing = sorted(set(want) - set(have))
    reshaped = sorted(k for k in have if tuple(have[k]) != tuple(want[k]))
    if missing or reshaped:
        detail = (
            f"missing {', '.join(missing[:8])}"
            if missing
            else "; ".join(f"{k} is {have[k]} not {want[k]}" for k in reshaped[:8])
        )
        raise CheckpointError(
            f"Checkpoints have differing keys: {other.path.name} differs from "
            f"{first.path.name} ({detail}). Pass checkpoints of one model, or leave the "
            "differing layers out with `exclude`.",
            argument="exclude",
        )


@dataclass
class CheckpointSet:
    """Checked checkpoints in the order they become snapshots, with each one's epoch and step.

    ``epochs`` are NaN and ``steps`` -1 where neither the name nor the file tells; ``order`` is
    ``"step"``, ``"epoch"`` or ``"name"``.
    """

    pattern: str
    files: list[Path]
    epochs: list[float]
    steps: list[int]
    order: str
    selection: Selection
    config: RecordConfig

    def describe(self, head: int = 10, tail: int = 5) -> str:
        """A short table: file -> epoch, step (``?`` where unknown)."""
        why = {
            "step": "",
            "epoch": " (not every file has a step)",
            "name": " (not every file has a step or an epoch)",
        }[self.order]
        width = max(len(f.name) for f in self.files)
        order = "file-name" if self.order == "name" else self.order
        rows = [f"{len(self.files)} checkpoints, in {order} order{why}:"]
        rows.append(f"  {'file':{width}s} {'epoch':>8s} {'step':>10s}")
        shown = list(range(len(self.files)))
        if len(shown) > head + tail + 1:
            shown = shown[:head] + [-1] + shown[-tail:]
        for i in shown:
            if i < 0:
                rows.append(f"  ... {len(self.files) - head - tail} more")
                continue
            epoch = "?" if math.isnan(self.epochs[i]) else f"{self.epochs[i]:g}"
            step = "?" if self.steps[i] < 0 else str(self.steps[i])
            rows.append(f"  {self.files[i].name:{width}s} {epoch:>8s} {step:>10s}")
        unknown = sum(math.isnan(e) for e in self.epochs)
        if unknown:
            rows.append(
                f"epoch unknown for {unknown} of them (stored as NaN): name files like "
                "epoch_3.pt or save an `epoch` entry to give it."
            )
        return "\n".join(rows)


def _position(ckpt: Checkpoint) -> tuple[float, int]:
    """The name's epoch and step, else the checkpoint's own, else NaN and -1."""
    epoch, step = position_from_name(ckpt.path.name)
    epoch = epoch if epoch is not None else ckpt.epoch
    step = step if step is not None else ckpt.step
    if step is not None and step >= _STEP_LIMIT:
        raise _bad_position(ckpt.path, "step in the file name", step, "an integer < 2**63")
    if epoch is not None and not math.isfinite(epoch):
        raise _bad_position(ckpt.path, "epoch in the file name", epoch, "a finite number")
    return (math.nan if epoch is None else float(epoch)), (-1 if step is None else int(step))


def scan_checkpoints(pattern: str, config: RecordConfig | None = None) -> CheckpointSet:
    """Open every checkpoint matching ``pattern``: check keys and shapes, find epochs and steps.

    Nothing is written; :func:`write_checkpoints` writes the result.

    Raises:
        CheckpointError: no match, an unreadable file, bad epoch/step entries, differing keys.
        NoEligibleLayersError: the selection in ``config`` matches no layer.
    """
    config = config or RecordConfig()
    files = find_checkpoints(pattern)
    with open_checkpoint(files[0]) as first:
        selection = select_state_dict(
            dict(first.shapes), config.include, config.exclude, config.types
        )
        positions = [_position(first)]
    for f in files[1:]:  # check every file before writing anything
        with open_checkpoint(f) as other:
            _check_same(first, other, selection.views)
            positions.append(_position(other))
    epochs = [e for e, _ in positions]
    steps = [s for _, s in positions]
    if all(s >= 0 for s in steps):
        order, key = "step", steps
    elif not any(math.isnan(e) for e in epochs):
        order, key = "epoch", epochs
    else:
        order, key = "name", list(range(len(files)))  # find_checkpoints' natural order
    idx = sorted(range(len(files)), key=key.__getitem__)  # stable: ties keep name order
    return CheckpointSet(
        pattern,
        [files[i] for i in idx],
        [epochs[i] for i in idx],
        [steps[i] for i in idx],
        order,
        selection,
        config,
    )


def write_checkpoints(
    found: CheckpointSet, path: str | Path, *, force: bool = False, progress: bool = False
) -> Path:
    """Write checked checkpoints (from :func:`scan_checkpoints`) into a new run file."""
    from tqdm.auto import tqdm

    from ..store.writer import RunWriter

    config, views = found.config, found.selection.views
    meta = {
        **config.metadata,
        "source": "checkpoints",
        "pattern": found.pattern,
        "files": [f.name for f in found.files],
        "skipped": found.selection.skipped,
    }
    cfg = {
        "include": config.include,
        "exclude": config.exclude,
        "types": config.types,
        "dtype": config.dtype,
        "metadata": meta,
    }
    writer = RunWriter.create(
        path, views, model_class="state_dict", storage_dtype=config.dtype, config=cfg, force=force
    )
    rows = zip(found.files, found.epochs, found.steps)
    with writer:
        for f, epoch, step in tqdm(
            rows, total=len(found.files), desc="checkpoints", unit="file", disable=not progress
        ):
            with open_checkpoint(f) as ckpt:
                mats = (to_storage(v, ckpt.tensor(v.param_name), config.dtype) for v in views)
                metrics = {k: v for k, v in ckpt.scalars.items() if np.isfinite(v)}
                writer.append(mats, step=step, epoch=epoch, metrics=metrics)
    return Path(path)


def record_checkpoints(
    pattern: str,
    path: str | Path,
    config: RecordConfig | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write the checkpoints matching ``pattern`` into a new run file, in step/epoch order.

    Args:
        pattern: a glob such as ``"ckpts/epoch_*.pt"``.
        path: the run file to create.
        config: layer selection and storage dtype (``initial`` is ignored: the checkpoints are the
            snapshots; so is ``background``: nothing trains meanwhile, so each is written at once).
        force: replace an existing run file.
        progress: show a progress bar.

    Returns:
        The path of the run file.
    """
    return write_checkpoints(
        scan_checkpoints(pattern, config), path, force=force, progress=progress
    )
