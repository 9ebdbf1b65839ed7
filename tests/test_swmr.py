"""A second process reads a run while it is being written (HDF5 SWMR).

The writer is ``helpers/record_forever.py``: snapshot ``t`` holds ``t + i/10`` in layer ``i``.
It appends ten snapshots 0.2 s apart, then holds the file open until told to close it. This
process opens the run as soon as it exists, polls ``Run.refresh()`` and checks every snapshot it
sees while the writer is still running.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_name("helpers")))
from crash_trial import Writer, check_open_run  # noqa: E402

import basis_stability as bs  # noqa: E402

SIZES = "256,256,128,64"
N_NEW = 10
HANG_GUARD_S = 120  # not a timing assertion: only stops a broken refresh from looping forever


def test_reader_sees_snapshots_while_they_are_written(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    writer = Writer(path, "--sizes", SIZES, "--count", str(N_NEW), "--interval", "0.2", "--hold")
    counts_seen = []  # the count after each refresh that found new snapshots
    try:
        writer.wait_for("ready")
        with bs.open_run(path) as run:
            seen = run.n_snapshots
            assert seen >= 1
            check_open_run(run, range(seen), SIZES)
            deadline = time.monotonic() + HANG_GUARD_S
            while seen < 1 + N_NEW and time.monotonic() < deadline:
                new = run.refresh()
                assert run.n_snapshots == seen + new
                if new:
                    check_open_run(run, range(seen, run.n_snapshots), SIZES)
                    seen = run.n_snapshots
                    counts_seen.append(seen)
                assert writer.proc.poll() is None, f"the writer exited early:\n{writer.output()}"
                time.sleep(0.02)
            # the writer holds the file open: all of the above happened while it was running
            writer.release()
            code = writer.finish()
            run.refresh()
            final = run.n_snapshots
            check_open_run(run, range(final), SIZES)
    finally:
        writer.stop()
    assert code == 0, writer.output()
    assert final == 1 + N_NEW, f"the reader sees {final} snapshots after the writer closed"
    assert seen == 1 + N_NEW, f"while the writer ran, the reader saw the run grow as {counts_seen}"
    assert len(counts_seen) >= 2, f"the reader saw the run grow only as {counts_seen}"
