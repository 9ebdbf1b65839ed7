"""Shared fixtures: the small runs and data that many tests build the same way.

Session-scoped fixtures are built once per test session and are read-only by contract: a test
that writes anything beside or into a run (appends, an analysis with its cache beside the run,
damage) takes the function-scoped copy in its own ``tmp_path`` instead; the shared run files
are checked at the end of the session to be unchanged, with nothing written beside them.

=================  ========  ===============================================================
fixture            scope     holds
=================  ========  ===============================================================
tiny_snapshots     session   the weights of the tiny run: ``[t][layer]`` float32 arrays in the
                             tall shapes of ``helpers.runs.SMALL_LAYERS`` (read-only arrays)
tiny_run_file      session   a closed run of those ``TINY_COUNT`` snapshots (step = epoch = t)
tiny_run           function  a copy of it at ``tmp_path / "run.h5"``
mlp_run_file       session   ``bstab record --model mlp --epochs 3`` on digits (4 snapshots, 3
                             Linear layers)
mlp_run            function  a copy of it at ``tmp_path / "mlp.h5"``
digits             session   the digits :class:`~basis_stability.zoo.Dataset` (seed 0)
tiny_digits        function  a fresh Dataset of its first 96 training samples (cloned tensors)
=================  ========  ===============================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import small_run, small_snapshots

TINY_COUNT = 4  # snapshots in the tiny run
TINY_DIGITS = 96  # training samples in tiny_digits (3 batches of 32)


@pytest.fixture(scope="session")
def tiny_snapshots() -> list[list[np.ndarray]]:
    snaps = small_snapshots(TINY_COUNT)
    for mats in snaps:
        for mat in mats:
            mat.setflags(write=False)  # shared by every test of the session
    return snaps


def _read_only(path: Path) -> Iterator[Path]:
    """Yield ``path``; at the end of the session, fail if a test changed it or wrote beside it."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    yield path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"a test changed {path}"
    beside = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert beside == [], f"a test wrote {beside} beside the shared {path}; use its copy"


@pytest.fixture(scope="session")
def tiny_run_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("tiny") / "run.h5"
    small_run(path, TINY_COUNT)
    yield from _read_only(path)


@pytest.fixture
def tiny_run(tiny_run_file: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(tiny_run_file, tmp_path / "run.h5"))


@pytest.fixture(scope="session")
def mlp_run_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from helpers.cli import bstab

    path = tmp_path_factory.mktemp("mlp") / "mlp.h5"
    result = bstab("record", "--model", "mlp", "--epochs", "3", "--no-progress", "-o", path)
    assert result.exit_code == 0, result.output
    yield from _read_only(path)


@pytest.fixture
def mlp_run(mlp_run_file: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(mlp_run_file, tmp_path / "mlp.h5"))


@pytest.fixture(scope="session")
def digits():
    from basis_stability.zoo import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture
def tiny_digits(digits):
    return dataclasses.replace(
        digits,
        x_train=digits.x_train[:TINY_DIGITS].clone(),
        y_train=digits.y_train[:TINY_DIGITS].clone(),
    )
