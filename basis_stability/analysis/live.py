"""Live stability: at every snapshot, each layer's S against the snapshot before, while recording.

    rec = bs.Recorder(model, "run.h5", live=bs.LiveStability(tensorboard="runs/tb"))

At every snapshot after the first, :class:`LiveTracker` measures ``S(previous, this)`` of every
recorded layer and the network's mean S (weighted by ``m n``, NaN layers left out: the
analysis' ``weighted_S``, :func:`~.stability.mean_stability`), and logs them as
``stability/S/<layer>`` and ``stability/S_mean`` at the snapshot's step. The maths is the
analysis' own (:func:`~.stability.decompose` in float64, so the same rank decision: S is NaN
where :func:`basis_stability.analyze` gives NaN), on the host copy the recorder already made for
the snapshot, on its background writer thread. Only each layer's previous polar basis ``U V^T``
is kept (float64, one ``(m, n)`` matrix per layer), so every snapshot is decomposed once.

The recorder (an earlier stage) knows only the protocol this module implements: it calls
``LiveStability.start(views)`` and then the tracker's ``observe``, ``take`` and ``close``
(:mod:`basis_stability.recording.live`).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, expected, require
from ..store.format import decode
from ..views import LayerView
from .spectra import SVD
from .stability import Decomposed, decompose, mean_stability, stability

__all__ = ["LiveStability", "LiveTracker", "MEAN_TAG", "TAG_PREFIX", "layer_tag"]

#: every tag live stability logs starts with this
TAG_PREFIX = "stability/"
MEAN_TAG = "stability/S_mean"

_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NONE = torch.empty(0, 0, dtype=torch.float64)


def layer_tag(name: str) -> str:
    """The tag of one layer's S: ``stability/S/<layer>``."""
    return f"{TAG_PREFIX}S/{name}"


@dataclass(frozen=True)
class LiveStability:
    """Log each layer's S against the previous snapshot, and the mean S, at every snapshot.

    Pass it as ``live=`` to :class:`~basis_stability.recording.Recorder`, ``bs.record`` or the
    Lightning and Hugging Face recording callbacks (which also send the values to the
    framework's loggers). The values of every snapshot are also kept for
    ``Recorder.live_metrics()``.

    Attributes:
        tensorboard: a directory for a ``torch.utils.tensorboard.SummaryWriter`` the recorder
            opens (and closes with itself); None: no TensorBoard file of its own. Needs
            ``pip install 'basis_stability[tensorboard]'``.

    Example:
        >>> live = LiveStability()  # values for the framework's loggers and live_metrics()
    """

    tensorboard: str | Path | None = None

    def __post_init__(self) -> None:
        path = self.tensorboard
        if path is not None and (not isinstance(path, (str, os.PathLike)) or not str(path)):
            raise ConfigError(
                expected(
                    "tensorboard",
                    "a directory for TensorBoard's event files (a str or Path) or None",
                    path,
                    "E.g. LiveStability(tensorboard='runs/tb').",
                )
            )
        if path is not None:
            require(
                "torch.utils.tensorboard",
                "tensorboard",
                "LiveStability(tensorboard=...)",
                package="tensorboard",
            )

    def start(self, views: Sequence[LayerView]) -> LiveTracker:
        """The tracker of one recording of ``views`` (called by the recorder)."""
        return LiveTracker(views, self)


class LiveTracker:
    """Live stability of one recording: each layer's previous basis, the TensorBoard writer
    and the values not taken yet. :meth:`observe` runs on the recorder's writer thread,
    :meth:`take` on the training thread."""

    def __init__(self, views: Sequence[LayerView], config: LiveStability) -> None:
        self.names = [view.name for view in views]
        self.sizes = [view.shape[0] * view.shape[1] for view in views]
        self._previous: dict[str, Decomposed] = {}
        self._ready: deque[tuple[int, dict[str, float]]] = deque()
        self._tb = None
        if config.tensorboard is not None:
            tensorboard = require("torch.utils.tensorboard", "tensorboard", "LiveStability")
            self._tb = tensorboard.SummaryWriter(log_dir=str(config.tensorboard))

    def observe(self, step: int, matrices: Sequence[np.ndarray], storage: str) -> None:
        """Measure one committed snapshot: ``matrices`` are its stored arrays in layer order
        (bfloat16 as raw bits), ``storage`` their storage dtype. Logs nothing for the first."""
        if len(matrices) != len(self.names):
            raise ValueError(f"Expected {len(self.names)} matrices but got {len(matrices)}.")
        first, values = not self._previous, []
        for name, matrix in zip(self.names, matrices):
            w = torch.from_numpy(decode(np.asarray(matrix), storage))  # (m, n), as analyze reads
            now = decompose(w, torch.float64, _STORAGE[storage])
            before = self._previous.get(name)
            self._previous[name] = _basis_only(now)
            values.append(math.nan if before is None else stability(before, now).value)
        if first:  # no snapshot before this one
            return
        metrics = {layer_tag(n): v for n, v in zip(self.names, values)}
        metrics[MEAN_TAG] = mean_stability(values, self.sizes)
        if self._tb is not None:
            for tag, value in metrics.items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()
        self._ready.append((step, metrics))

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """The ``(step, {tag: value})`` of the snapshots measured since the last call."""
        out = []
        while self._ready:
            out.append(self._ready.popleft())
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _basis_only(dec: Decomposed) -> Decomposed:
    """What the next pair needs of a snapshot: its basis (and why it has none), not U or Vh."""
    svd = SVD(_NONE, dec.svd.S, _NONE)
    return Decomposed(svd, dec.basis, dec.reason, dec.error)
