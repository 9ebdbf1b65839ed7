"""Turn checkpoints a user already has into a run, without retraining.

Each checkpoint is a state dict in a ``.pt``/``.pth``/``.bin`` file (loaded with
``weights_only=True``; a dict that nests it under ``state_dict``, ``model`` or
``model_state_dict`` works too) or a ``.safetensors`` file. Files are ordered naturally by the
numbers in their names (``epoch_2`` before ``epoch_10``), every file is checked for the same keys
and shapes *before* anything is written, and tensors are read one at a time.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..views import LayerView, select_state_dict, strip_wrapper_prefix
from .recorder import RecordConfig, to_storage

_NESTED = ("state_dict", "model_state_dict", "model")
_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def natural_key(path: Path) -> tuple:
    """Sort key that orders ``epoch_2`` before ``epoch_10``."""
    return tuple(int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name))


def find_checkpoints(pattern: str) -> list[Path]:
    """The files matching a glob, in natural order.

    Raises:
        CheckpointError: nothing matched, or a match is not a checkpoint file.
    """
    paths = sorted((Path(p) for p in glob.glob(pattern, recursive=True)), key=natural_key)
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise CheckpointError(
            f"Expected `--from-checkpoints` to match checkpoint files but "
            f"{pattern!r} matched nothing. Quote the glob so the shell does "
            "not expand it, and check the folder."
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
    """One opened checkpoint: tensor shapes, lazy tensor access and scalar extras."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    scalars: dict[str, float] = field(default_factory=dict)
    _tensors: Mapping[str, torch.Tensor] | None = None
    _safe: object | None = None

    def __post_init__(self) -> None:
        # keys without DDP/compile prefixes -> keys in the file
        self._keys = {strip_wrapper_prefix(k): k for k in self.shapes}
        self.shapes = {strip_wrapper_prefix(k): s for k, s in self.shapes.items()}

    def tensor(self, key: str) -> torch.Tensor:
        key = self._keys[key]
        if self._safe is not None:
            return self._safe.get_tensor(key)
        return self._tensors[key]


def _unnest(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, float]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict. Save "
            "`model.state_dict()` (not the model object)."
        )
    scalars = {
        k: float(v)
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for key in _NESTED:
        if isinstance(obj.get(key), Mapping):
            return obj[key], scalars
    return obj, {}


@contextmanager
def open_checkpoint(path: Path) -> Iterator[Checkpoint]:
    """Open one checkpoint for lazy reading."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            safe = safe_open(str(path), framework="pt")
            shapes = {k: tuple(safe.get_slice(k).get_shape()) for k in safe.keys()}  # noqa: SIM118
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch/safetensors raise many types for unreadable files
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {exc}. Check that it is a "
            "state dict saved with torch.save or safetensors."
        ) from None
    if path.suffix == ".safetensors":
        with safe:  # yield outside the try: errors of the caller's block are not "cannot read"
            yield Checkpoint(path, shapes, _safe=safe)
        return
    state, scalars = _unnest(obj, path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    yield Checkpoint(path, {k: tuple(v.shape) for k, v in tensors.items()}, scalars, tensors)


def _epoch_of(ckpt: Checkpoint, index: int) -> float:
    if "epoch" in ckpt.scalars:
        return ckpt.scalars["epoch"]
    numbers = re.findall(r"\d+", ckpt.path.stem)
    return float(numbers[-1]) if numbers else float(index)


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
            f"{first.path.name} ({detail}). Pass checkpoints of one model, or "
            "--exclude the differing layers."
        )


def record_checkpoints(
    pattern: str,
    path: str | Path,
    config: RecordConfig | None = None,
    *,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write the checkpoints matching ``pattern`` into a new run file, in natural order.

    Args:
        pattern: a glob such as ``"ckpts/epoch_*.pt"``.
        path: the run file to create.
        config: layer selection and storage dtype (``initial`` is ignored: the checkpoints are the
            snapshots).
        force: replace an existing run file.
        progress: show a progress bar.

    Returns:
        The path of the run file.
    """
    from tqdm.auto import tqdm

    from ..store.writer import RunWriter

    config = config or RecordConfig()
    files = find_checkpoints(pattern)
    with open_checkpoint(files[0]) as first:
        shapes = {k: s for k, s in first.shapes.items()}
        selection = select_state_dict(shapes, config.include, config.exclude, config.types)
    views = selection.views
    for f in files[1:]:  # check every file before writing anything
        with open_checkpoint(f) as other:
            _check_same(first, other, views)
    meta = {
        **config.metadata,
        "source": "checkpoints",
        "pattern": pattern,
        "files": [f.name for f in files],
        "skipped": selection.skipped,
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
    with writer:
        for i, f in enumerate(tqdm(files, desc="checkpoints", unit="file", disable=not progress)):
            with open_checkpoint(f) as ckpt:
                mats = (to_storage(v, ckpt.tensor(v.param_name), config.dtype) for v in views)
                step = int(ckpt.scalars.get("step", ckpt.scalars.get("global_step", -1)))
                metrics = {
                    k: v
                    for k, v in ckpt.scalars.items()
                    if k not in ("epoch", "step", "global_step") and np.isfinite(v)
                }
                writer.append(mats, step=step, epoch=_epoch_of(ckpt, i), metrics=metrics)
    return Path(path)
