"""The analysis engine, in four parts (this module gathers their public names):

* :mod:`.config` -- :class:`EngineConfig`, how the decompositions are computed;
* :mod:`.decompose` -- the maths: the Gram route (float64 ``W^T W`` and its eigendecomposition,
  batched over snapshots) with a float64 SVD where it would lose accuracy, and the rebuilding of
  the polar basis and top vectors from the run's weights;
* :mod:`.cache` -- the sidecar cache format (s, V and route per snapshot; the measured pairs);
* :mod:`.pool` -- the tasks a cache lacks, computed here or in worker processes;

plus :mod:`.pairs`, which measures S and the overlaps of pairs of snapshots from them.
"""

from __future__ import annotations

from .cache import (
    CACHE_FORMAT,
    CacheDamagedError,
    SVDCache,
    default_cache_path,
    run_identity,
)
from .config import CACHE_VERSION, EngineConfig
from .decompose import (
    GRAM_COND,
    Decomposition,
    decompose_batch,
    decompose_snapshots,
    storage_dtype,
)
from .pool import decompose_task, fill_cache, pending_tasks

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "GRAM_COND",
    "CacheDamagedError",
    "Decomposition",
    "EngineConfig",
    "SVDCache",
    "pending_tasks",
    "decompose_batch",
    "decompose_snapshots",
    "decompose_task",
    "default_cache_path",
    "fill_cache",
    "run_identity",
    "storage_dtype",
]
