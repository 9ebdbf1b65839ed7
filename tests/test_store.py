"""The run store: write with RunWriter, read back with open_run, and survive crashes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from basis_stability.errors import ConfigError, RunExistsError, RunFileError, RunMismatchError
from basis_stability.store import FORMAT_VERSION, RunWriter, open_run, recover
from basis_stability.store.h5io import write_digest
from basis_stability.views import LayerView

# "fc" is a Linear (8, 4), "conv" a Conv2d (4, 3, 2, 2) seen as its (12, 4) transpose
LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (8, 4)),
    LayerView.of("conv", "conv.weight", "conv2d", (4, 3, 2, 2)),
]


def _snapshots(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``n`` snapshots, each one float32 array per layer in its tall shape."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS] for _ in range(n)]


def _write(path: Path, snaps: list[list[np.ndarray]], **kw) -> None:
    with RunWriter.create(path, LAYERS, model_class="Toy", **kw) as w:
        for t, mats in enumerate(snaps):
            w.append(iter(mats), step=10 * t, epoch=t / 2)


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    _write(path, _snapshots(4))
    return path


def _add_half_snapshot(path: Path) -> int:
    """Simulate a writer killed mid-snapshot: layer rows and a metric row past the commit."""
    with h5py.File(path, "r+") as f:
        t = len(f["snapshots"])
        ds = f["layers/fc"]
        ds.resize(t + 1, axis=0)
        ds[t] = np.full(ds.shape[1:], 99.0, dtype=ds.dtype)
        f["metrics/values"].resize((t + 1, max(1, f["metrics/values"].shape[1])))
    return t


def test_round_trip_values_steps_epochs_and_attrs(run_path: Path):
    snaps = _snapshots(4)
    with open_run(run_path) as run:
        assert run.n_snapshots == 4
        assert run.layer_names == ["fc", "conv"]
        assert run.model_class == "Toy"
        assert run.format_version == FORMAT_VERSION == "1.3"
        np.testing.assert_array_equal(run.steps, [0, 10, 20, 30])
        np.testing.assert_array_equal(run.epochs, [0.0, 0.5, 1.0, 1.5])
        assert np.all(np.diff(run.wall_time) >= 0)
        for i, name in enumerate(run.layer_names):
            info = run.info(name)
            assert (info.shape, info.transposed) == (LAYERS[i].shape, LAYERS[i].transposed)
            assert info.orig_shape == LAYERS[i].orig_shape
            for t, got in enumerate(run.layer(name)):
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, snaps[t][i])


def test_metrics_round_trip_with_nan_for_missing_and_late_names(tmp_path: Path):
    path = tmp_path / "run.h5"
    mats = _snapshots(1)[0]
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        w.append(iter(mats))  # no metrics at all
        w.append(iter(mats), metrics={"loss": 2.0})
        w.append(iter(mats), metrics={"loss": 1.5, "acc": 0.25})
        w.append(iter(mats), metrics={"acc": torch.tensor(0.5)})
    with open_run(path) as run:
        assert run.metric_names == ["loss", "acc"]
        nan = np.nan
        want = np.array([[nan, nan], [2.0, nan], [1.5, 0.25], [nan, 0.5]])
        np.testing.assert_array_equal(run.metrics_array(), want)
        frame = run.snapshots()
        assert list(frame.columns) == ["snapshot", "step", "epoch", "wall_time", "loss", "acc"]
        np.testing.assert_array_equal(frame["loss"].to_numpy(), want[:, 0])
        assert list(frame["step"]) == [-1] * 4 and frame["epoch"].isna().all()


def test_lazy_slicing_and_negative_indices(run_path: Path):
    snaps = np.stack([s[0] for s in _snapshots(4)])  # (T, 8, 4) of layer "fc"
    with open_run(run_path) as run:
        fc = run.layer("fc")
        assert len(fc) == 4
        np.testing.assert_array_equal(fc[-1], snaps[3])
        np.testing.assert_array_equal(fc[-4], snaps[0])
        np.testing.assert_array_equal(fc[1:3], snaps[1:3])
        np.testing.assert_array_equal(fc[::-2], snaps[::-2])
        np.testing.assert_array_equal(fc[[3, 0, -2]], snaps[[3, 0, 2]])
        assert fc[4:].shape == (0, 8, 4)
        for bad in (4, -5):
            with pytest.raises(IndexError):
                fc[bad]
        with pytest.raises(KeyError, match="fc, conv"):
            run.layer("nope")


def test_original_undoes_the_tall_view(run_path: Path):
    snaps = _snapshots(4)
    with open_run(run_path) as run:
        conv = run.layer("conv")
        original = conv.original(2)
        assert original.shape == (4, 3, 2, 2)
        # oracle: the tall (12, 4) matrix is the transpose of weight.reshape(4, 12)
        np.testing.assert_array_equal(original.reshape(4, -1).T, snaps[2][1])
        np.testing.assert_array_equal(run.layer("fc").original(-1), snaps[3][0])


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "disk"),
    [("float16", torch.float16, np.float16), ("bfloat16", torch.bfloat16, np.uint16)],
)
def test_half_precision_storage_decodes_like_torch(tmp_path, dtype, torch_dtype, disk):
    path = tmp_path / "run.h5"
    full = _snapshots(2, seed=3)
    full[0][0][0, :3] = [1e-30, 70000.0, -0.0]  # subnormal/overflow cases where formats differ
    stored, want = [], []
    for mats in full:
        halves = [torch.from_numpy(m).to(torch_dtype) for m in mats]
        want.append([h.float().numpy() for h in halves])
        if dtype == "bfloat16":
            stored.append([h.view(torch.int16).numpy().view(np.uint16) for h in halves])
        else:
            stored.append([h.numpy() for h in halves])
    _write(path, stored, storage_dtype=dtype)
    with open_run(path) as run:
        assert run.attrs["storage_dtype"] == dtype
        assert run.info("fc").storage_dtype == dtype
        assert run.h5["layers/fc"].dtype == disk
        for t in range(2):
            for i, name in enumerate(run.layer_names):
                got = run.layer(name)[t]
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, want[t][i])
                assert np.signbit(got).tolist() == np.signbit(want[t][i]).tolist()


def test_append_rejects_float_values_for_bfloat16_bits(tmp_path: Path):
    path = tmp_path / "run.h5"
    with RunWriter.create(path, LAYERS, model_class="Toy", storage_dtype="bfloat16") as w:
        with pytest.raises(ConfigError, match="bfloat16"):
            w.append(iter(_snapshots(1)[0]))  # float32, not the uint16 bits
        assert w.n_snapshots == 0
    with open_run(path) as run:
        assert run.n_snapshots == 0


def test_create_refuses_existing_file_and_leaves_it_untouched(run_path: Path):
    before = run_path.read_bytes()
    with pytest.raises(RunExistsError, match="mode='overwrite'"):
        RunWriter.create(run_path, LAYERS[:1], model_class="Other")
    assert run_path.read_bytes() == before
    assert [p.name for p in run_path.parent.iterdir()] == ["run.h5"]  # no temporary left


def test_create_with_force_replaces_the_file(run_path: Path):
    with RunWriter.create(run_path, LAYERS[:1], model_class="Other", force=True) as w:
        w.append(iter([np.ones((8, 4), np.float32)]))
    with open_run(run_path) as run:
        assert (run.model_class, run.layer_names, run.n_snapshots) == ("Other", ["fc"], 1)
        np.testing.assert_array_equal(run.layer("fc")[0], np.ones((8, 4)))


def test_create_refuses_a_directory(tmp_path: Path):
    with pytest.raises(RunFileError, match="directory"):
        RunWriter.create(tmp_path, LAYERS, model_class="Toy", force=True)


def test_resume_appends_after_the_last_snapshot(run_path: Path):
    old, new = _snapshots(4), _snapshots(2, seed=1)
    with RunWriter.resume(run_path, LAYERS) as w:
        assert w.n_snapshots == 4
        for mats in new:
            w.append(iter(mats), step=99, metrics={"loss": 1.0})
    with open_run(run_path) as run:
        assert run.n_snapshots == 6
        np.testing.assert_array_equal(run.steps, [0, 10, 20, 30, 99, 99])
        np.testing.assert_array_equal(run.layer("conv")[:], np.stack([s[1] for s in old + new]))
        np.testing.assert_array_equal(run.metrics_array()[:, 0], [np.nan] * 4 + [1.0, 1.0])


@pytest.mark.parametrize(
    "layers",
    [
        LAYERS[:1],  # a layer missing
        [*LAYERS, LayerView.of("extra", "extra.weight", "linear", (3, 3))],  # one more
        [LAYERS[0], LayerView.of("conv", "conv.weight", "conv2d", (4, 3, 3, 3))],  # reshaped
    ],
)
def test_resume_with_other_layers_or_shapes_raises_mismatch(run_path: Path, layers):
    before = run_path.read_bytes()
    with pytest.raises(RunMismatchError, match="does not match"):
        RunWriter.resume(run_path, layers)
    assert run_path.read_bytes() == before


def test_half_written_last_snapshot_is_ignored_by_reader_and_dropped_on_resume(run_path: Path):
    snaps = _snapshots(4)
    assert _add_half_snapshot(run_path) == 4
    with open_run(run_path) as run:
        assert run.n_snapshots == 4 and len(run.layer("fc")) == 4
        np.testing.assert_array_equal(run.layer("fc")[-1], snaps[3][0])
        assert run.metrics_array().shape == (4, 0)
    fresh = _snapshots(1, seed=5)[0]
    with RunWriter.resume(run_path, LAYERS) as w:
        w.append(iter(fresh), step=40)
    with open_run(run_path) as run:
        assert run.n_snapshots == 5
        np.testing.assert_array_equal(run.steps, [0, 10, 20, 30, 40])
        np.testing.assert_array_equal(run.layer("fc")[4], fresh[0])
        assert run.h5["layers/fc"].shape[0] == 5


def _foreign(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(3)


def _other_format(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "someone.else"


def _newer_version(path: Path) -> None:
    _write(path, _snapshots(1))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = "2.0"


def _truncated(path: Path) -> None:
    src = path.with_name("full.h5")
    _write(src, _snapshots(3))
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "No run file"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: p.write_text("step,loss\n1,0.5\n"), "not an HDF5 file"),
        (_foreign, "not a basis_stability run"),
        (_other_format, "another kind"),
        (_newer_version, "newer than this"),
        (_truncated, "truncated or corrupt"),
    ],
    ids=["missing", "directory", "text", "foreign", "other-format", "v2.0", "truncated"],
)
def test_open_run_errors(tmp_path: Path, make, message):
    path = tmp_path / "run.h5"
    make(path)
    with pytest.raises(RunFileError, match=message):
        open_run(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_run_is_refused_not_read_as_zeros(tmp_path: Path, keep: float):
    # an SWMR open skips HDF5's end-of-file check: the reader used to return zero matrices
    full, cut = tmp_path / "full.h5", tmp_path / "cut.h5"
    _write(full, _snapshots(3))
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(RunFileError, match="truncated"):
        open_run(cut)


def test_minor_version_bump_still_opens(tmp_path: Path):
    path = tmp_path / "run.h5"
    _write(path, _snapshots(1))
    with h5py.File(path, "r+") as f:  # as a newer writer would make it, digest included
        f.attrs["format_version"] = "1.7"
        write_digest(f)
    with open_run(path) as run:
        assert run.n_snapshots == 1


# --------------------------------------------------------------------- a killed writer
_KILLED_WRITER = """
import os, sys
import numpy as np
from basis_stability.store import RunWriter
from basis_stability.views import LayerView
layers = [LayerView.of("fc", "fc.weight", "linear", (8, 4)),
          LayerView.of("conv", "conv.weight", "conv2d", (4, 3, 2, 2))]
w = RunWriter.create(sys.argv[1], layers, model_class="Toy")
for t in range(3):
    w.append((np.full(v.shape, t, np.float32) + np.arange(v.shape[1]) for v in layers),
             step=t, metrics={"loss": float(t)})
print("appended", w.n_snapshots, flush=True)
os.kill(os.getpid(), 9)
"""


def _expected_killed(t: int, shape: tuple[int, int]) -> np.ndarray:
    return np.full(shape, t, np.float32) + np.arange(shape[1])


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("killed") / "run.h5"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "appended 3"
    return path


@pytest.fixture
def killed_copy(killed_run: Path, tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    shutil.copyfile(killed_run, path)
    return path


def _check_killed_contents(path: Path, n: int = 3) -> None:
    with open_run(path) as run:
        assert run.n_snapshots == n
        np.testing.assert_array_equal(run.steps[:3], [0, 1, 2])
        np.testing.assert_array_equal(run.metrics_array()[:3, 0], [0.0, 1.0, 2.0])
        for t in range(3):
            for v in LAYERS:
                np.testing.assert_array_equal(run.layer(v.name)[t], _expected_killed(t, v.shape))


def test_killed_writer_leaves_a_file_that_cannot_be_reopened_for_writing(killed_copy: Path):
    with pytest.raises(OSError):  # the premise of recover(): HDF5's consistency flag is set
        h5py.File(killed_copy, "r+", libver="latest")
    _check_killed_contents(killed_copy)  # but readers see every committed snapshot


def test_recover_keeps_the_committed_snapshots(killed_copy: Path):
    assert recover(killed_copy) == 3
    _check_killed_contents(killed_copy)
    with h5py.File(killed_copy, "r+", libver="latest"):
        pass  # writable again
    assert [p.name for p in killed_copy.parent.iterdir()] == ["run.h5"]


def test_resume_after_a_killed_writer_recovers_and_appends(killed_copy: Path):
    mats = [np.full(v.shape, 7, np.float32) for v in LAYERS]
    with RunWriter.resume(killed_copy, LAYERS) as w:
        w.append(iter(mats), step=3, metrics={"loss": 3.0})
    _check_killed_contents(killed_copy, n=4)
    with open_run(killed_copy) as run:
        np.testing.assert_array_equal(run.layer("conv")[3], mats[1])
        np.testing.assert_array_equal(run.metrics_array()[:, 0], [0.0, 1.0, 2.0, 3.0])


def test_events_round_trip_and_survive_recovery(tmp_path: Path):
    """Decisions logged with log_event are read back in order, also after a crash recovery."""
    path = tmp_path / "ev.h5"
    views = [LayerView.of("fc", "fc.weight", "linear", (4, 3))]
    with RunWriter.create(path, views, model_class="Toy") as w:
        w.append(iter([np.ones((4, 3), np.float32)]), step=0, epoch=0.0)
        assert w.log_event({"event": "convert", "step": 5, "beta": 0.15})
        assert w.log_event({"event": "update", "step": 9, "ranks": {"fc": 2}})
    with open_run(path) as run:
        assert run.events() == [
            {"beta": 0.15, "event": "convert", "step": 5},
            {"event": "update", "ranks": {"fc": 2}, "step": 9},
        ]
    recover(path)  # the copy keeps the events
    with open_run(path) as run:
        assert [e["event"] for e in run.events()] == ["convert", "update"]


def _events(path: Path, steps: list[int | None]) -> None:
    with RunWriter.resume(path, LAYERS) as w:
        for i, s in enumerate(steps):
            w.log_event({"event": f"e{i}", **({} if s is None else {"step": s})})


def test_resume_with_keep_backs_up_then_drops_later_snapshots_and_events(run_path: Path):
    # snapshots at steps 0, 10, 20, 30; events at 5, 15, 25 and one without a step
    _events(run_path, [5, 15, None, 25])
    before = run_path.read_bytes()
    with RunWriter.resume(run_path, LAYERS, keep=2) as w:  # rolled back to step 10
        assert w.n_snapshots == 2
        w.append(iter(_snapshots(1, seed=7)[0]), step=20)
    backups = sorted(run_path.parent.glob("run.before-resume-4*.h5"))
    assert len(backups) == 1 and backups[0].read_bytes() == before  # nothing recorded is lost
    with open_run(run_path) as run:
        np.testing.assert_array_equal(run.steps, [0, 10, 20])
        np.testing.assert_array_equal(run.layer("fc")[:2], np.stack([s[0] for s in _snapshots(2)]))
        np.testing.assert_array_equal(run.layer("fc")[2], _snapshots(1, seed=7)[0][0])
        assert [e["event"] for e in run.events()] == ["e0", "e2"]  # 15 and 25 were later
    with open_run(backups[0]) as old:
        assert old.n_snapshots == 4 and len(old.events()) == 4


def test_resume_step_drops_events_after_the_checkpoint_even_with_no_later_snapshot(
    run_path: Path,
):
    _events(run_path, [5, 32, 35])
    with RunWriter.resume(run_path, LAYERS, keep=4, step=33):  # checkpoint at step 33
        pass
    with open_run(run_path) as run:
        assert run.n_snapshots == 4
        assert [e["event"] for e in run.events()] == ["e0", "e1"]
    assert len(list(run_path.parent.glob("run.before-resume-4*.h5"))) == 1
    # a second rollback to the same point changes nothing and makes no second backup
    with RunWriter.resume(run_path, LAYERS, keep=4, step=33):
        pass
    assert len(list(run_path.parent.glob("run.before-resume-4*.h5"))) == 1


def test_resume_keep_must_not_be_negative(run_path: Path):
    with pytest.raises(ConfigError, match="keep"):
        RunWriter.resume(run_path, LAYERS, keep=-1)
    with open_run(run_path) as run:
        assert run.n_snapshots == 4


def test_a_metric_named_like_an_index_column_does_not_replace_it(tmp_path: Path):
    # broke once: HF logs an "epoch" metric, which overwrote the snapshot's own epoch column
    path = tmp_path / "run.h5"
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        for t, mats in enumerate(_snapshots(2)):
            w.append(iter(mats), step=t, epoch=t / 2, metrics={"epoch": 7.0, "step": 9.0})
    with open_run(path) as run:
        frame = run.snapshots()
    np.testing.assert_array_equal(frame["epoch"], [0.0, 0.5])
    np.testing.assert_array_equal(frame["step"], [0, 1])
    np.testing.assert_array_equal(frame["epoch (metric)"], [7.0, 7.0])
    np.testing.assert_array_equal(frame["step (metric)"], [9.0, 9.0])
