"""The format spec: the committed reference file reads back exactly, and the validator catches
files that break the written rules."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from basis_stability import open_run
from basis_stability.store import FORMAT_VERSION
from basis_stability.store.validate import validate_run

SPEC_DIR = Path(__file__).resolve().parents[1] / "checkpoints_spec"
REFERENCE = SPEC_DIR / "reference_v1.h5"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_reference", SPEC_DIR / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


def expected_param(orig_shape: tuple[int, ...], t: int) -> np.ndarray:
    # Independent of the maker: value = t + 0.1 * flat index, in the parameter's own shape.
    return (t + 0.1 * np.arange(np.prod(orig_shape))).reshape(orig_shape).astype(np.float32)


@pytest.mark.parametrize("path", [REFERENCE, "fresh"], ids=["committed", "regenerated"])
def test_reference_file_reads_back_closed_form_values(path, tmp_path):
    if path == "fresh":
        path = maker.write_reference(tmp_path / "ref.h5")
    with open_run(path) as run:
        assert run.n_snapshots == 3  # the half-written fourth row is ignored
        assert run.layer_names == ["fc", "conv", "attn.in_proj", "h.c_proj"]
        shapes = {i.name: (i.shape, i.transposed, i.orig_shape, i.orientation) for i in run.layers}
        assert shapes == {
            "fc": ((4, 3), True, (3, 4), "out_in"),
            "conv": ((4, 2), True, (2, 1, 2, 2), "out_in"),
            "attn.in_proj": ((6, 2), False, (6, 2), "out_in"),
            "h.c_proj": ((3, 3), True, (3, 3), "in_out"),  # (in, out): the Linear's W is W.T
        }
        for info in run.layers:
            snaps = run.layer(info.name)
            for t in range(3):
                np.testing.assert_array_equal(snaps.original(t), expected_param(info.orig_shape, t))
                mat = expected_param(info.orig_shape, t).reshape(info.orig_shape[0], -1)
                np.testing.assert_array_equal(snaps[t], mat.T if info.transposed else mat)
        np.testing.assert_array_equal(run.steps, [0, 10, 20])
        np.testing.assert_array_equal(run.epochs, [0.0, 1.0, 2.0])
        frame = run.snapshots()
        np.testing.assert_allclose(frame["acc"], [0.5, 0.7, 0.9])
        assert np.isnan(frame["loss"][0])
        np.testing.assert_allclose(frame["loss"][1:], [1 / 2, 1 / 3])
        assert run.format_version == FORMAT_VERSION
        assert run.events() == [
            {"event": "check", "step": 10, "stable_share": 0.5},
            {"event": "convert", "step": 20, "beta": 0.15},
        ]


def test_a_format_1_0_file_without_events_still_reads_and_validates(tmp_path):
    old = tmp_path / "v1_0.h5"
    shutil.copy(REFERENCE, old)
    with h5py.File(old, "r+", libver="latest") as f:
        del f["events"]
        f.attrs["format_version"] = "1.0"
    with open_run(old) as run:
        assert run.n_snapshots == 3 and run.events() == []
    report = validate_run(old)
    assert report.ok and not [f for f in report.findings if f.where == "/events"]


def test_validator_rejects_events_that_are_not_json_objects(tmp_path):
    path = tmp_path / "bad_events.h5"
    shutil.copy(REFERENCE, path)
    with h5py.File(path, "r+", libver="latest") as f:
        f["events"][0] = b"[1, 2]"
    report = validate_run(path)
    assert not report.ok
    assert any("row 0 is not a JSON object" in f.message for f in report.findings)


def test_reference_file_validates_and_reports_the_half_written_row():
    report = validate_run(REFERENCE)
    assert report.ok, [str(f) for f in report.findings]
    assert [(f.level, f.where) for f in report.findings] == [("info", "/layers/fc")]


def test_spec_json_in_checkpoints_spec_is_the_one_the_package_uses():
    from basis_stability.store.format import format_description

    on_disk = json.loads((SPEC_DIR / "run_format.json").read_text())
    assert on_disk == format_description()
    assert on_disk["format_version"] == FORMAT_VERSION
    assert f"format {FORMAT_VERSION}" in (SPEC_DIR / "FORMAT.md").read_text()


def _doctored(tmp_path: Path, edit) -> Path:
    path = tmp_path / "doctored.h5"
    shutil.copy(REFERENCE, path)
    with h5py.File(path, "r+", libver="latest") as f:
        edit(f)
    return path


def _replace_fc(f: h5py.File, dtype: str = "f4", shape=(3, 4, 3), chunks=(1, 4, 3)) -> None:
    attrs = dict(f["layers/fc"].attrs)
    del f["layers/fc"]
    ds = f["layers"].create_dataset(
        "fc", shape=shape, maxshape=(None, *shape[1:]), chunks=chunks, dtype=dtype
    )
    for k, v in attrs.items():
        ds.attrs[k] = v


BREAKAGES = {
    "missing format_version": (
        lambda f: f.attrs.__delitem__("format_version"),
        "missing attribute `format_version`",
    ),
    "config not JSON": (lambda f: f.attrs.__setitem__("config", "{oops"), "not valid JSON"),
    "unknown storage dtype": (
        lambda f: f.attrs.__setitem__("storage_dtype", "int8"),
        "expected one of",
    ),
    "other major version": (
        lambda f: f.attrs.__setitem__("format_version", "2.0"),
        "another major version",
    ),
    "layer missing attribute": (
        lambda f: f["layers/conv"].attrs.__delitem__("kind"),
        "missing attribute `kind`",
    ),
    "wrong layer dtype": (lambda f: _replace_fc(f, dtype="f8"), "does not store float32"),
    "orig_shape disagrees": (
        lambda f: f["layers/conv"].attrs.__setitem__("orig_shape", np.array([2, 2, 2, 2])),
        "does not give the stored",
    ),
    "layer lacks committed rows": (
        lambda f: f["layers/conv"].resize(2, axis=0),
        "has 2 snapshots but /snapshots commits 3",
    ),
    "no snapshots dataset": (lambda f: f.__delitem__("snapshots"), "missing dataset"),
    "not tall": (lambda f: _replace_fc(f, shape=(3, 3, 4), chunks=(1, 3, 4)), "is not tall"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_validator_reports_each_broken_rule(name, tmp_path):
    edit, message = BREAKAGES[name]
    report = validate_run(_doctored(tmp_path, edit))
    assert not report.ok
    assert any(message in f.message for f in report.findings if f.level == "error"), [
        str(f) for f in report.findings
    ]


def test_validator_flags_nan_weights_as_warning(tmp_path):
    def poison(f):
        f["layers/conv"][1, 0, 0] = np.nan

    report = validate_run(_doctored(tmp_path, poison))
    assert report.ok
    assert any("NaN/Inf values in 1 snapshot(s): 1" in f.message for f in report.findings)


def test_validator_on_non_runs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    assert [f.message for f in validate_run(text).findings] == ["not an HDF5 file"]
    assert [f.message for f in validate_run(tmp_path / "nope.h5").findings] == ["no such file"]
    messages = [f.message for f in validate_run(foreign).findings]
    assert "missing attribute `format`" in messages
