"""A small run and a catalogue of ways to damage it, shared by the damage and fuzz tests.

``make_run(path)`` writes three layers (a Linear 12x6, a Conv2d 4x2x2x2 and a Linear 3x12), six
snapshots with metrics and two events. Each entry of ``STRUCTURAL`` edits such a file with
h5py the way a hostile tester did, and names what a reader must say about it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn


def make_run(path: Path, snapshots: int = 6) -> Path:
    from basis_stability import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Conv2d(2, 4, 2), nn.Linear(12, 3))
    with Recorder(model, path, mode="overwrite") as rec:
        for t in range(1, snapshots):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            rec.snapshot(epoch=t, step=10 * t, metrics={"loss": 1.0 / t, "acc": 0.5 + t / 20})
            rec.log_event({"event": "check", "step": 10 * t, "stable_share": t / 10})
    return path


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            fn(f)

    return apply


def _attr(name: str, value) -> Callable[[h5py.File], None]:
    return lambda f: f["layers/0"].attrs.__setitem__(name, value)


def _truncate(n: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:n] if n >= 0 else data[:n])

    return apply


def _layer_like(name: str, m: int, n: int) -> Callable[[h5py.File], None]:
    """Add a layer declaring an (m, n) matrix for every committed snapshot, data never written."""

    def apply(f: h5py.File) -> None:
        rows = len(f["snapshots"])
        ds = f["layers"].create_dataset(
            name, shape=(rows, m, n), dtype="<f4", chunks=(1, m, n) if m * n else None
        )
        for key, value in f["layers/0"].attrs.items():
            ds.attrs[key] = value
        ds.attrs["orig_shape"] = np.array([m, n])

    return apply


def _group_layer(f: h5py.File) -> None:
    f["layers"].create_group("enc")
    f["layers/enc"].create_dataset("0", data=np.zeros((6, 4, 4), np.float32))


# commands that do not read the damaged part and may succeed (with the clean run's numbers)
UNAFFECTED = {"bad-event-json": {"analyze", "export"}}

# (id, damage, words the error must contain)
STRUCTURAL: list[tuple[str, Callable[[Path], None], str]] = [
    ("bad-config-json", _edit(lambda f: f.attrs.__setitem__("config", "{not json")), "config"),
    ("config-not-object", _edit(lambda f: f.attrs.__setitem__("config", "[1]")), "config"),
    ("bad-event-json", _edit(lambda f: f["events"].__setitem__(0, b"{oops")), "event 0"),
    ("no-orig-shape", _edit(lambda f: f["layers/0"].attrs.__delitem__("orig_shape")), "orig_shape"),
    ("no-transposed", _edit(lambda f: f["layers/0"].attrs.__delitem__("transposed")), "transposed"),
    ("wrong-transposed", _edit(_attr("transposed", True)), "do not give the stored"),
    ("wrong-orig-shape", _edit(_attr("orig_shape", np.array([6, 12]))), "do not give the stored"),
    ("bf16-attr-on-f32", _edit(_attr("storage_dtype", "bfloat16")), "storage_dtype"),
    ("unknown-storage", _edit(_attr("storage_dtype", "int8")), "storage_dtype"),
    ("huge-declared-layer", _edit(_layer_like("huge", 6000, 4000)), "declare"),
    ("unwritten-layer", _edit(_layer_like("ghost", 8, 4)), "metadata_sha256"),
    ("zero-size-layer", _edit(_layer_like("z", 3, 0)), "empty"),
    ("renamed-param", _edit(_attr("param_name", "0\x0eweight")), "metadata_sha256"),
    ("group-in-layers", _edit(_group_layer), "Group"),
    (
        "soft-link",
        _edit(lambda f: f["layers"].__setitem__("alias", h5py.SoftLink("/layers/0"))),
        "SoftLink",
    ),
    (
        "dangling-link",
        _edit(lambda f: f["layers"].__setitem__("gone", h5py.SoftLink("/nowhere"))),
        "SoftLink",
    ),
    (
        "hard-link-twice",
        _edit(lambda f: f["layers"].__setitem__("again", f["layers/0"])),
        "second name",
    ),
    (
        "no-layers",
        _edit(lambda f: [f["layers"].__delitem__(k) for k in list(f["layers"])]),
        "no recorded layers",
    ),
    (
        "layers-not-group",
        _edit(lambda f: (f.__delitem__("layers"), f.create_dataset("layers", data=[1]))),
        "layers",
    ),
    ("no-snapshots", _edit(lambda f: f.__delitem__("snapshots")), "snapshots"),
    ("truncated-47", _truncate(47), "truncated"),
    ("truncated-11", _truncate(11), "truncated"),
    ("truncated-half", lambda p: _truncate(p.stat().st_size // 2)(p), "truncated"),
    ("empty-file", _truncate(0), "not an HDF5 file"),
    (
        "rows-short",
        _edit(lambda f: f["layers/2"].resize(3, axis=0)),
        "rows for 6 snapshots",
    ),
    (
        "bad-version",
        _edit(lambda f: f.attrs.__setitem__("format_version", "one")),
        "format_version",
    ),
]


def metadata_json(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["config"])
