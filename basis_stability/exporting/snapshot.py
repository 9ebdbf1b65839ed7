"""Export one recorded snapshot of a run as a state-dict file (``.safetensors`` or torch ``.pt``).

The keys are the parameters' own names (``features.0.weight``), the tensors have the parameters'
own shapes and, by default, the dtype the run stored them in, bit for bit (bfloat16 included), so
tools that read safetensors files or torch state dicts can analyse a run's weights directly.

With the matrices come the biases, norm weights and buffers the run stores with each snapshot
(format 1.3, ``RecordConfig.biases``), so the export of a run that recorded every >= 2-D
parameter is the model's complete state dict at that snapshot: ``load_state_dict(strict=True)``
accepts it. Keys the run lacks are named (a warning, and ``missing_keys`` in the metadata).

Example:
    >>> path = export_snapshot("runs/cnn.h5", snapshot=-1)  # doctest: +SKIP
    >>> from safetensors.torch import load_file  # doctest: +SKIP
    >>> model.load_state_dict(load_file(path))  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, Message, NoEligibleLayersError, expected
from ..store import state as st
from ..store.paths import refuse_existing, write_atomically
from ..store.reader import LayerInfo, Run, open_run

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "pt")
DTYPES = ("stored", "float32")
METADATA_FORMAT = "basis_stability.snapshot"
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
_OVERWRITE_OR_RENAME = Message(
    "Pass `force=True` to overwrite it or choose another `out_path`", ["force"]
)


@dataclass(frozen=True)
class SnapshotExport:
    """What :func:`export_snapshot` wrote."""

    path: Path
    snapshot: int  # the resolved, non-negative index
    step: int
    epoch: float
    format: str
    n_tensors: int
    n_bytes: int  # size of the written file
    missing: list[str] | None = None  # the model's state-dict keys not written; None: unknown

    def missing_line(self) -> str | None:
        """One sentence on what the file lacks, or None when it is the complete state dict."""
        if self.missing is None:
            return (
                "The run does not list its model's state-dict keys (recorded before format 1.3, "
                "or imported from checkpoints), so biases and buffers may be missing from the "
                "export; load it with strict=False."
            )
        if not self.missing:
            return None
        shown = ", ".join(self.missing[:10])
        more = f" and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        return (
            f"Missing {len(self.missing)} of the model's state-dict keys (not recorded): "
            f"{shown}{more}; load it with strict=False, or record them (every >= 2-D layer "
            "selected, biases on)."
        )


def _stored_tensor(arr: np.ndarray, storage_dtype: str):
    """Stored values -> a torch tensor of the storage dtype (bfloat16 bits reinterpreted)."""
    import torch

    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))
    if storage_dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _check_choice(arg: str, value: str | None, choices: Sequence[str], fix: str) -> None:
    if value is not None and value not in choices:
        raise ConfigError(expected(arg, f"one of {', '.join(choices)}", value, fix))


def _resolve_format(out_path: Path | None, format: str | None) -> str | None:
    """The output format from ``format`` and the output suffix; None: decide later (default)."""
    _check_choice("format", format, FORMATS, "safetensors is the portable choice.")
    if out_path is None:
        return format
    by_suffix = _SUFFIX_FORMATS.get(out_path.suffix.lower())
    if by_suffix is None:
        if format is None:
            raise ConfigError(
                expected(
                    "out_path",
                    "a file ending in .safetensors or .pt",
                    str(out_path),
                    'Rename it or pass `format="safetensors"` (or "pt") explicitly.',
                ),
                argument="format",
            )
        return format
    if format is not None and format != by_suffix:
        raise ConfigError(
            expected(
                "format",
                f"{by_suffix} for an output ending in {out_path.suffix}",
                format,
                f"Drop the format or name the output *.{format}.",
            )
        )
    return by_suffix


def _resolve_snapshot(run: Run, snapshot: int) -> int:
    if isinstance(snapshot, bool) or not isinstance(snapshot, (int, np.integer)):
        raise ConfigError(
            expected("snapshot", "an integer index", snapshot, "Use -1 for the last snapshot.")
        )
    n = run.n_snapshots
    if n == 0:
        raise ConfigError(
            f"{run.path} has no committed snapshots, so there is nothing to export. "
            "Record at least one snapshot first."
        )
    if not -n <= snapshot < n:
        raise ConfigError(
            expected(
                "snapshot",
                f"in the range {-n}..{n - 1} ({n} snapshots)",
                int(snapshot),
                "Use 0 for the first snapshot and -1 for the last.",
            )
        )
    return int(snapshot) % n


def _select(run: Run, layers: str | Sequence[str] | None) -> list[LayerInfo]:
    """The layers whose name (or parameter name) matches any glob, in the run's order."""
    if layers is None:
        return list(run.layers)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        return list(run.layers)
    names = ", ".join(run.layer_names)
    for pattern in patterns:
        if not any(
            fnmatch.fnmatchcase(info.name, pattern) or fnmatch.fnmatchcase(info.param_name, pattern)
            for info in run.layers
        ):
            raise NoEligibleLayersError(
                expected(
                    "layers",
                    f"globs matching some of the run's layers ({names})",
                    pattern,
                    "Quote the glob and pick from those names.",
                )
            )
    return [
        info
        for info in run.layers
        if any(
            fnmatch.fnmatchcase(info.name, p) or fnmatch.fnmatchcase(info.param_name, p)
            for p in patterns
        )
    ]


def default_output(run_path: str | os.PathLike, snapshot: int, format: str = "safetensors") -> Path:
    """``RUN-snapshot<N>.<format>`` beside the run (``N`` a non-negative index)."""
    run_path = Path(run_path)
    return run_path.with_name(f"{run_path.stem}-snapshot{snapshot}.{format}")


def _check_output(out: Path, run_path: Path, force: bool) -> None:
    same = out.resolve() == run_path.resolve() or (
        out.exists() and run_path.exists() and os.path.samefile(out, run_path)
    )
    if same:
        raise ConfigError(
            expected(
                "out_path",
                "a path other than the run file",
                str(out),
                "Choose another output; exporting over the run would destroy it.",
            )
        )
    if out.is_dir():
        raise ConfigError(
            expected(
                "out_path",
                "a file path",
                f"{out} (a directory)",
                f"Name a file inside it, e.g. {out / default_output(run_path, 0).name}.",
            )
        )
    if not force:
        refuse_existing(out, "out_path", _OVERWRITE_OR_RENAME)


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _state_selected(run: Run, infos: list[LayerInfo], subset: bool) -> list[st.StateEntry]:
    """The state entries to export: all of them, or with a layer subset those of the selected
    layers' own modules (``up.bias`` with layer ``up``)."""
    entries = list(run.state_index.entries)
    if not subset:
        return entries
    modules = {_module(info.param_name) for info in infos}
    return [e for e in entries if _module(e.key) in modules]


def _state_tensor(arr: np.ndarray, entry: st.StateEntry, dtype: str):
    """A stored state entry -> a torch tensor of its own dtype (``float32``: half widened)."""
    import torch

    # np.require, not np.ascontiguousarray: that one makes a 0-D entry 1-D
    arr = np.require(arr.astype(arr.dtype.newbyteorder("="), copy=False), requirements="C")
    if entry.dtype == "bfloat16":
        tensor = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    elif entry.dtype == "bool":
        tensor = torch.from_numpy(arr).to(torch.bool)
    else:
        tensor = torch.from_numpy(arr)
    if dtype == "float32" and entry.dtype in ("float16", "bfloat16"):
        tensor = tensor.float()
    return tensor


def _complete(run: Run, tensors: dict, subset_modules: set[str] | None) -> list[str] | None:
    """Add the tied keys and the empty tensors the run implies; return the model's keys still
    missing (None when the run does not list them), and put ``tensors`` in state-dict order."""
    import torch

    for alias, owner in run.state_index.tied.items():
        if owner in tensors and alias not in tensors:
            tensors[alias] = tensors[owner].clone()  # one tensor under two keys, as in the model
    model = run.model_keys
    if model is None:
        return None
    for key in model:
        empty = key.shape is not None and math.prod(key.shape) == 0 and key.dtype in st.DTYPES
        wanted = subset_modules is None or _module(key.key) in subset_modules
        if empty and wanted and key.key not in tensors:
            tensors[key.key] = torch.empty(key.shape, dtype=getattr(torch, key.dtype))
    order = {key.key: i for i, key in enumerate(model)}
    ordered = sorted(tensors.items(), key=lambda item: order.get(item[0], len(order)))
    tensors.clear()
    tensors.update(ordered)
    return [key.key for key in model if key.key not in tensors]


def _metadata(
    run: Run, run_path: Path, t: int, dtype: str, infos: list[LayerInfo], missing: list[str] | None
) -> dict:
    """The string metadata of a ``.safetensors`` export (see :func:`export_snapshot`)."""
    from .. import __version__

    stored = sorted({info.storage_dtype for info in infos})
    step = int(run.steps[t])
    epoch = float(run.epochs[t])
    metadata = {
        "format": METADATA_FORMAT,
        "basis_stability_version": str(__version__),
        "run": str(run_path),
        "run_format_version": run.format_version,
        "model_class": run.model_class,
        "snapshot": str(t),
        "n_snapshots": str(run.n_snapshots),
        "step": str(step),
        "epoch": "nan" if math.isnan(epoch) else repr(epoch),
        "storage_dtype": ",".join(stored),
        "dtype": ",".join(stored) if dtype == "stored" else dtype,
        "complete": "unknown" if missing is None else str(not missing).lower(),
    }
    if missing is not None:
        metadata["missing_keys"] = json.dumps(missing)
    return metadata


def _check_unique_keys(run_path: Path, infos: list[LayerInfo]) -> None:
    keys = [info.param_name for info in infos]
    if len(set(keys)) != len(keys):
        raise ConfigError(
            f"{run_path} records one parameter under several layer names ({keys}); "
            "export them separately with `layers`.",
            argument="layers",
        )


def _snapshot_tensors(
    run: Run, infos: list[LayerInfo], t: int, dtype: str
) -> tuple[dict, list[str] | None]:
    """Snapshot ``t`` as ``{state-dict key: tensor}``: the selected layers' parameters, then
    the state entries (with a layer subset, those of its modules), tied keys and empty tensors;
    and the model's keys it still lacks (None: the run does not list them)."""
    import torch

    tensors = {}
    for info in infos:  # one layer at a time from the file
        snaps = run.layer(info.name)
        if dtype == "float32":
            tensors[info.param_name] = torch.from_numpy(snaps.original(t))
        else:
            raw = snaps.original(t, stored=True)
            tensors[info.param_name] = _stored_tensor(raw, info.storage_dtype)
    subset = len(infos) < len(run.layers)
    entries = _state_selected(run, infos, subset)
    values = run.state(t, stored=True) if entries else {}
    for entry in entries:
        tensors[entry.key] = _state_tensor(values[entry.key], entry, dtype)
    modules = {_module(info.param_name) for info in infos} if subset else None
    return tensors, _complete(run, tensors, modules)


def _file_writer(fmt_name: str, tensors: dict, metadata: dict) -> Callable[[Path], None]:
    """What writes the tensors into a (temporary) file of the format."""
    if fmt_name == "safetensors":
        from safetensors.torch import save_file

        return lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    import torch

    # a plain state dict: torch.load(weights_only=True) reads it
    return lambda tmp: torch.save(tensors, tmp)


def write_snapshot(
    run_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    snapshot: int = -1,
    format: str | None = None,
    dtype: str | None = None,
    layers: str | Sequence[str] | None = None,
    force: bool = False,
) -> SnapshotExport:
    """:func:`export_snapshot`, returning what was written instead of logging what the file
    lacks (``bstab export`` prints both). The arguments and errors are :func:`export_snapshot`'s.

    Returns:
        A :class:`SnapshotExport`: the path, the snapshot, its step and epoch, the size and the
        model's keys the file lacks.
    """
    dtype = dtype or "stored"
    _check_choice("dtype", dtype, DTYPES, "stored is bit-exact; float32 widens half precision.")
    out = Path(out_path) if out_path is not None else None
    fmt_name = _resolve_format(out, format)  # None only without an out_path
    run_path = Path(run_path)
    with open_run(run_path) as run:
        t = _resolve_snapshot(run, snapshot)
        infos = _select(run, layers)
        fmt_name = fmt_name or "safetensors"
        out = out or default_output(run_path, t, fmt_name)
        _check_output(out, run_path, force)
        _check_unique_keys(run_path, infos)
        tensors, missing = _snapshot_tensors(run, infos, t, dtype)
        metadata = _metadata(run, run_path, t, dtype, infos, missing)
    write_atomically(
        out, _file_writer(fmt_name, tensors, metadata), force=force, argument="out_path"
    )
    return SnapshotExport(
        path=out,
        snapshot=t,
        step=int(metadata["step"]),
        epoch=float(metadata["epoch"]),
        format=fmt_name,
        n_tensors=len(tensors),
        n_bytes=out.stat().st_size,
        missing=missing,
    )


def export_snapshot(
    run_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    snapshot: int = -1,
    format: str | None = None,
    dtype: str | None = None,
    layers: str | Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Write one snapshot of a run as a state-dict file that other tools can read.

    Args:
        run_path: the run file (``.h5``).
        out_path: the file to write; default ``RUN-snapshot<N>.safetensors`` beside the run.
        snapshot: the snapshot index; negative counts from the end (-1, the default, is the last).
        format: ``safetensors`` or ``pt``; default from the suffix of ``out_path``
            (``.safetensors``, ``.pt``/``.pth``), else safetensors. An explicit format must agree
            with that suffix.
        dtype: ``stored`` (default; the run's storage dtype, bit for bit, bfloat16 included) or
            ``float32`` (half precision widened exactly).
        layers: layer-name globs (fnmatch; the parameter name matches too) to export only some
            layers, with the biases and buffers of their own modules (``up.bias`` with ``up``);
            every glob must match a layer. Such an export is partial by design.
        force: overwrite an existing ``out_path``.

    The keys are the parameters' names in the model (``features.0.weight``), the tensors have the
    parameters' own shapes. With the matrices come the biases, norm weights and buffers the run
    stores (format 1.3), each in its own dtype, exactly (``dtype="float32"`` widens half
    precision ones), and a tied key (a head sharing an embedding's tensor) under both names, so
    a run that recorded every >= 2-D parameter exports the model's complete state dict. Keys of
    the model the run lacks (biases off, unrecorded layers) are logged as a warning. A
    ``.safetensors`` file carries the run path, snapshot index, step, epoch, storage dtype,
    package version, ``complete`` (``true``, ``false`` or ``unknown`` for runs that do not list
    their model's keys) and ``missing_keys`` (a JSON list) as string metadata; a ``.pt`` file is
    a plain dict of tensors (``torch.load(path, weights_only=True)`` reads it) and nothing else.

    Returns:
        The path written (via a temporary file beside it, moved into place).

    Raises:
        ConfigError: a bad format, dtype or snapshot index, a format that contradicts the
            suffix, or an output that is the run itself or a directory.
        NoEligibleLayersError: a ``layers`` glob matched no layer (the message lists them).
        RunExistsError: ``out_path`` exists and ``force`` is false (it is left untouched).
        RunFileError: the run cannot be read.
    """
    result = write_snapshot(run_path, out_path, snapshot, format, dtype, layers, force)
    line = result.missing_line()
    if line is not None:
        log.warning("%s: %s", result.path, line)
    return result.path
