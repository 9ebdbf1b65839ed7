"""What to record and how (:class:`RecordConfig`), and the checks of a snapshot's inputs."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, expected

# the storage dtypes of a run's matrices, as torch dtypes
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RecordConfig:
    """What to record and how.

    Attributes:
        include: name patterns a layer must match (globs, or ``re:`` regular expressions).
        exclude: name patterns that drop a layer.
        types: layer kinds to keep (``linear``, ``conv*``, ``mha``, ``embedding``, ...).
        dtype: storage dtype, ``float32`` (exact, default), ``float16`` or ``bfloat16``.
        initial: take a snapshot of the initial weights (step 0, epoch 0) when a run is created.
        metadata: free-form JSON-able facts about the run (hyper-parameters, dataset, ...).
        biases: also store, with every snapshot, the biases and the other small non-matrix
            state: 1-D parameters such as LayerNorm/BatchNorm weights, and buffers such as
            running statistics (every 0-D or 1-D ``state_dict()`` entry that is not a recorded
            matrix), exactly, in their own dtype. With the matrices, that makes an exported
            snapshot a complete state dict. False (``bstab record --no-biases``): matrices only.
        background: write snapshots on a background thread. :meth:`Recorder.snapshot` copies
            the weights into host buffers kept for the purpose (pinned for CUDA weights: one
            extra host copy of the recorded tensors, two while snapshots come faster than they
            are written) and returns; the thread writes, flushes and commits, one snapshot at
            a time. A SIGKILL loses at most the snapshot being
            written; a failed write is raised by the recorder's next call. False (``bstab
            record --no-background``): each snapshot is committed before ``snapshot()``
            returns. Not stored in the run: it changes when, not what, is written.
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    types: Sequence[str] | None = None
    dtype: str = "float32"
    initial: bool = True
    metadata: Mapping[str, Any] = field(default_factory=dict)
    biases: bool = True
    background: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.background, (bool, np.bool_)):
            raise ConfigError(
                expected(
                    "background",
                    "True or False",
                    self.background,
                    "False writes each snapshot before snapshot() returns.",
                )
            )
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(
                expected(
                    "dtype",
                    f"one of {', '.join(TORCH_DTYPES)}",
                    self.dtype,
                    "float32 is exact; the others halve the file.",
                )
            )


def check_step(step: Any) -> int:
    """An optimizer step: an integer >= 0 (a Python, numpy or one-element torch integer), or -1
    for unknown. Floats (even 2.0) and bools are refused: a step rounded silently is a wrong step.
    """
    wanted = "an integer optimizer step >= 0 (or -1 for unknown)"
    if isinstance(step, (bool, np.bool_)) or (
        isinstance(step, torch.Tensor) and step.dtype == torch.bool
    ):
        raise ConfigError(expected("step", wanted, step, "Pass the step count, e.g. step=10."))
    try:
        value = operator.index(step)  # int, numpy integers, integer tensors of one element
    except TypeError:
        raise ConfigError(
            expected("step", wanted, step, "Pass an int, e.g. step=int(global_step).")
        ) from None
    if value < -1 or value >= 2**63:  # the run file stores steps as int64
        raise ConfigError(expected("step", wanted, value, "Use -1 when the step is unknown."))
    return value
