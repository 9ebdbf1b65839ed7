"""SIGKILL safety: a recorder killed at a random instant leaves a valid run of exact snapshots.

The writer is ``helpers/record_forever.py`` in a real subprocess: snapshot ``t`` holds, in layer
``i``, every weight equal to ``t + i/10``, so each committed snapshot can be checked exactly. It
prints ``begin t`` / ``done t`` around each snapshot; after the kill the file must hold every
``done`` snapshot, plus at most the one in flight, and nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import pytest

sys.path.insert(0, str(Path(__file__).with_name("helpers")))
from crash_trial import (  # noqa: E402
    TrialResult,
    Writer,
    check_snapshots,
    kill_trial,
    read_counts,
    verify_trial,
)


def _flag_set(path: Path) -> bool:
    """Whether HDF5 still sees the file as open by a (dead) SWMR writer."""
    try:
        with h5py.File(path, "r+", libver="latest"):
            return False
    except OSError as exc:
        return "consistency flags" in str(exc)


def _resume(path: Path, start: int, count: int) -> None:
    """Append ``count`` snapshots from ``t = start`` in a subprocess; assert it went cleanly."""
    resumed = Writer(path, "--mode", "append", "--start", str(start), "--count", str(count))
    try:
        ready = resumed.wait_for("ready")
        code = resumed.finish()
    finally:
        resumed.stop()
    assert code == 0, resumed.output()
    assert ready == f"ready {start}", "the resumed recorder miscounted the committed snapshots"
    assert resumed.lines[-1] == "closed", resumed.output()


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_leaves_every_committed_snapshot_exact(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "run.h5"
    result = kill_trial(path, seed)
    verify_trial(result, path)
    path.unlink()  # up to ~1 GB; pytest keeps tmp dirs of recent sessions (failures stay)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130))
def test_sigkill_soak(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "run.h5"
    result = kill_trial(path, seed)
    verify_trial(result, path)
    path.unlink()  # up to ~1 GB; pytest keeps tmp dirs of recent sessions (failures stay)


def test_append_after_sigkill_resumes_after_last_committed(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    result = kill_trial(path, seed=7, delay=(0.3, 0.6))
    verify_trial(result, path)
    committed = result.committed
    assert _flag_set(path), "precondition: the killed writer should leave HDF5's write flag set"

    _resume(path, start=committed, count=3)
    # the old snapshots are intact and the three new ones follow the last committed one
    check_snapshots(path, committed + 3)
    assert not _flag_set(path), "the resumed run should be closed cleanly"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "run.h5")
    assert leftovers == [], f"temporary files left beside the run: {leftovers}"
    path.unlink()


def test_half_written_rows_on_disk_are_ignored_then_overwritten(tmp_path: Path) -> None:
    """A kill after some layer rows of snapshot 5 reached the disk, before its commit."""
    path = tmp_path / "run.h5"
    writer = Writer(path, "--die-inside", "5")
    try:
        writer.wait_for("ready")
        code = writer.finish()
    finally:
        writer.stop()
    committed, rows = read_counts(path)
    assert rows == 6, "precondition: the half-written rows of snapshot 5 should be on disk"
    result = TrialResult(
        seed=-1,
        delay_s=0.0,
        returncode=code,
        last_begin=writer.last("begin"),
        last_done=writer.last("done"),
        committed=committed,
        rows_on_disk=rows,
        output=writer.lines,
    )
    assert (result.last_begin, result.last_done) == (5, 4), writer.output()
    verify_trial(result, path)  # exactly snapshots 0..4

    _resume(path, start=5, count=2)
    check_snapshots(path, 7)  # snapshot 5 rewritten whole, then 6
