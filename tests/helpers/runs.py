"""Reading a whole (small) run back in the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import basis_stability as bs


def read_all(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """steps, epochs and every snapshot's weights (original shapes) by parameter name."""
    with bs.open_run(path) as run:
        snaps = [
            {info.param_name: run.layer(info.name).original(t) for info in run.layers}
            for t in range(run.n_snapshots)
        ]
        return run.steps.copy(), run.epochs.copy(), snaps
