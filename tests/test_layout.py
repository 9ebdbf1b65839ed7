"""The run file's declared HDF5 layout (store/layout.py): a file the writer made is exactly what
the tables declare, and the declaration agrees with its machine-checkable twin,
``store/run_format.json``."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from basis_stability.store import layout

FORMAT_JSON = Path(layout.__file__).with_name("run_format.json")


@pytest.fixture(scope="module")
def described() -> dict:
    return json.loads(FORMAT_JSON.read_text())


def _check(ds: h5py.Dataset, spec: layout.DatasetSpec) -> None:
    assert ds.ndim == spec.ndim, spec.path
    assert ds.chunks == spec.chunks_of(ds.shape), spec.path
    assert ds.maxshape == (spec.maxshape_of(ds.shape) or ds.shape), spec.path
    assert ds.fletcher32, spec.path  # every dataset is checksummed (format 1.2)
    if spec.dtype is not None:
        assert ds.dtype == np.dtype(spec.dtype), spec.path


def test_a_written_runs_tables_and_layers_are_as_declared(tiny_run_file: Path):
    with h5py.File(tiny_run_file, "r") as f:
        for spec in layout.TABLES:
            _check(f[spec.path], spec)
        names = list(f[layout.LAYERS.path])
        assert names == ["fc", "head"]  # creation order kept
        for name in names:
            ds = f[layout.LAYERS.path][name]
            _check(ds, layout.LAYER)
            assert ds.shape[0] == len(f[layout.SNAPSHOTS.path]) == 4
            assert ds.chunks == (1, *ds.shape[1:])  # one snapshot, one read
            for attr in layout.LAYER_ATTRS:
                assert attr.name in ds.attrs or not attr.required, (name, attr.name)
        assert np.isnan(f[layout.METRIC_VALUES.path].fillvalue)


def test_root_attributes_are_all_there_as_fixed_length_bytes(tiny_run_file: Path):
    with h5py.File(tiny_run_file, "r") as f:
        for attr in layout.ROOT_ATTRS:
            assert attr.name in f.attrs, attr.name
            stored = f.attrs.get_id(attr.name).dtype
            assert stored.kind == "S" and h5py.check_string_dtype(stored).length, attr.name
        assert f.attrs["format"] == b"basis_stability.run"


def test_the_declaration_agrees_with_run_format_json(described: dict):
    assert [a.name for a in layout.ROOT_ATTRS if a.required] == [
        n for n, a in described["root_attributes"].items() if a["required"]
    ]
    layer = described["layer"]
    assert layout.LAYER.ndim == layer["ndim"]
    assert {a.name: a.required for a in layout.LAYER_ATTRS} == {
        n: a["required"] for n, a in layer["attributes"].items()
    }
    by_path = {spec.path: spec for spec in layout.TABLES}
    tables = [
        described["snapshots"],
        described["events"],
        described["metrics"]["names"],
        described["metrics"]["values"],
    ]
    for table in tables:
        spec = by_path[table["path"]]
        assert spec.ndim == table["ndim"], spec.path
        shape = (0,) * spec.ndim
        assert list(spec.maxshape_of(shape)) == table["maxshape"], spec.path
    assert by_path["events"].since == (1, 1) and described["events"]["since"] == "1.1"
    assert layout.STATE_INDEX.path == described["state"]["index"]["path"]
    assert np.dtype(layout.STATE_INDEX.dtype) == np.dtype(described["state"]["index"]["dtype"])


def test_rows_kinds_say_which_datasets_a_resume_cuts_back():
    per_snapshot = {s.path for s in layout.DATASETS if s.per_snapshot}
    assert per_snapshot == {"layers/<name>", "state/<dtype>", "metrics/values"}
    assert layout.SNAPSHOTS.rows == layout.COMMIT_ROWS


def test_fixed_text_is_utf8_bytes():
    assert layout.fixed_text("Δ model") == np.bytes_("Δ model".encode())
    assert layout.fixed_text(3) == np.bytes_(b"3")
