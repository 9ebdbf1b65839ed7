"""Small runs for the tests: writing a random one, reading a whole one back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import basis_stability as bs
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

SMALL_LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (12, 6)),
    LayerView.of("head", "head.weight", "linear", (3, 8)),
]


def small_snapshots(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """The weights :func:`small_run` writes: per snapshot, one float32 array per layer of
    ``SMALL_LAYERS`` in its tall shape, drawn in that order from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(v.shape).astype(np.float32) for v in SMALL_LAYERS]
        for _ in range(count)
    ]


def small_run(path: Path, count: int = 4, close: bool = True) -> RunWriter:
    """A run of ``SMALL_LAYERS`` with ``count`` seeded random snapshots (step = epoch = t);
    its weights are ``small_snapshots(count)``."""
    writer = RunWriter.create(path, SMALL_LAYERS, model_class="Toy")
    for t, mats in enumerate(small_snapshots(count)):
        writer.append(iter(mats), step=t, epoch=t)
    if close:
        writer.close()
    return writer


def read_all(path: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """steps, epochs and every snapshot's weights (original shapes) by parameter name."""
    with bs.open_run(path) as run:
        snaps = [
            {info.param_name: run.layer(info.name).original(t) for info in run.layers}
            for t in range(run.n_snapshots)
        ]
        return run.steps.copy(), run.epochs.copy(), snaps
