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
REFERENCE_1_2 = SPEC_DIR / "reference_v1.2.h5"


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
        # format 1.3 state: fc.bias[i] = t + 0.5 i (float32), bn.num_batches_tracked = 10 t
        assert run.state_keys == ["fc.bias", "bn.num_batches_tracked"]
        for t in range(3):
            state = run.state(t)
            assert list(state) == ["fc.bias", "bn.num_batches_tracked"]
            assert state["fc.bias"].dtype == np.float32
            np.testing.assert_array_equal(state["fc.bias"], [t, t + 0.5, t + 1.0])
            assert state["bn.num_batches_tracked"].dtype == np.int64
            assert state["bn.num_batches_tracked"].shape == ()
            assert int(state["bn.num_batches_tracked"]) == 10 * t
        assert [(k.key, k.shape, k.dtype) for k in run.model_keys] == [
            ("fc.weight", (3, 4), "float32"),
            ("fc.bias", (3,), "float32"),
            ("conv.weight", (2, 1, 2, 2), "float32"),
            ("attn.in_proj_weight", (6, 2), "float32"),
            ("h.c_proj.weight", (3, 3), "float32"),
            ("bn.num_batches_tracked", (), "int64"),
            ("head.weight", (3, 4), "float32"),
        ]
        assert dict(run.state_index.tied) == {"head.weight": "fc.weight"}


def test_reference_state_reads_back_with_plain_h5py():
    """FORMAT.md's recipe, without basis_stability: the index, then a slice of a packed row."""
    with h5py.File(REFERENCE, "r") as f:
        n = len(f["snapshots"])
        index = json.loads(f["state/index"][:].tobytes())
        assert f["state/float32"].shape == (n + 1, 3)  # the half-written row is there
        rows = {d: f[f"state/{d}"][n - 1] for d in ("float32", "int64")}
        assert f["state/int64"].dtype == np.int64
        got = {}
        for e in index["entries"]:
            size = int(np.prod(e["shape"]))
            got[e["key"]] = rows[e["dtype"]][e["offset"] : e["offset"] + size].reshape(e["shape"])
    np.testing.assert_array_equal(got["fc.bias"], np.float32([2, 2.5, 3]))
    assert got["bn.num_batches_tracked"] == 20


def test_the_format_1_2_reference_still_reads_and_validates():
    """A 1.2 file has no /state and no `orientation`: it reads as it always did."""
    with open_run(REFERENCE_1_2) as run:
        assert run.format_version == "1.2"
        assert run.n_snapshots == 3
        assert run.layer_names == ["fc", "conv", "attn.in_proj"]
        for info in run.layers:
            assert info.orientation == "out_in"
            for t in range(3):
                np.testing.assert_array_equal(
                    run.layer(info.name).original(t), expected_param(info.orig_shape, t)
                )
        np.testing.assert_array_equal(run.steps, [0, 10, 20])
        assert run.state_keys == [] and run.state(0) == {} and run.model_keys is None
        assert len(run.events()) == 2
    report = validate_run(REFERENCE_1_2)
    assert report.ok, [str(f) for f in report.findings]
    assert [(f.level, f.where) for f in report.findings] == [("info", "/layers/fc")]


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
    assert [(f.level, f.where) for f in report.findings] == [
        ("info", "/layers/fc"),
        ("info", "/state/float32"),
    ]


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
    "state rows short": (
        lambda f: f["state/int64"].resize(2, axis=0),
        "has 2 snapshots but /snapshots commits 3",
    ),
    "state dataset gone": (lambda f: f["state"].__delitem__("int64"), "is missing"),
    "state index not JSON": (
        lambda f: f["state/index"].__setitem__(0, ord("[")),
        "not a state index",
    ),
    "state row of another width": (
        lambda f: (
            f["state"].__delitem__("float32"),
            f["state"].create_dataset("float32", shape=(3, 4), maxshape=(None, 4), dtype="f4"),
        ),
        "the index says float32 rows of 3",
    ),
    "state removed": (lambda f: f.__delitem__("state"), "fail their checksum"),
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
