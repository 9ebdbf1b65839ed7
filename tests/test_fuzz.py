"""Seeded fuzz: hundreds of truncated and bit-flipped copies of a small run, every CLI command.

``helpers/fuzz_runs.py`` runs ``inspect``, ``validate``, ``analyze`` and ``export`` on each copy
(in one subprocess, so that a hang is caught by the timeout and a crash by the exit code). Each
command must end with the undamaged file's exact results or with one clear ``Error:`` line:
no traceback, no "Unexpected", no number that differs without an error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("helpers") / "fuzz_runs.py"
HANG_GUARD_S = 400  # the 250 cases take ~20 s here; only a hang (the old hours-long retries) or
# a machine far slower than CI's reaches this


@pytest.mark.parametrize(
    "seed, cases, extra",
    [(10, 250, []), (11, 100, ["--crashed"])],
    ids=["closed-run", "crashed-writer-run"],
)
def test_damaged_copies_give_correct_numbers_or_one_clear_error(tmp_path, seed, cases, extra):
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path), "--seed", str(seed), "--cases", str(cases)]
        + extra,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    where = done.stderr.strip().splitlines()[-3:]
    assert done.returncode == 0, f"the driver died (exit {done.returncode}) at {where}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [], "\n".join(summary["failures"])
    assert summary["cases"] == cases
    # most damage must be detected (not only land in unused bytes): the test must be able to fail
    assert summary["with_errors"] > cases // 2, summary
