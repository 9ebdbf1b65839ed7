"""How the engine decomposes: :class:`EngineConfig` (the settings a cache is keyed on)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..devices import resolve_device
from ..errors import ConfigError, expected, non_negative_int, positive_int

# 4: the Gram route; the cache holds s, V (n x n) and a route per snapshot, plus the measured
#    pairs (S and cumulative overlaps), and no polar basis B (it is rebuilt from the run's weights)
CACHE_VERSION = 4
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class EngineConfig:
    """How the decompositions are computed.

    Attributes:
        svd: ``exact`` (every singular value and vector; every metric) or ``approx``
            (randomised top-``kmax`` SVD: overlaps, top singular values and stable rank only;
            S needs every singular vector and is NaN in this mode).
        method: how exact mode decomposes. ``gram`` (default): the float64 Gram matrix
            ``W^T W`` and its symmetric eigendecomposition, batched over snapshots, with a
            float64 SVD where the condition number exceeds
            :data:`~basis_stability.analysis.decompose.GRAM_COND`; ``svd``: a compact SVD per
            snapshot in ``svd_dtype`` (ill-conditioned ones redone in float64).
        svd_dtype: ``float32`` or ``float64``: the precision of the cached singular vectors
            (and of the ``svd`` method); never half precision, whatever was stored. The Gram
            route always computes in float64.
        kmax: singular vectors kept per snapshot for overlaps (bounds the k of the top-k
            overlap).
        oversample: extra random directions of the approximate mode.
        power_iters: power iterations of the approximate mode.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        jobs: worker processes (layers are spread over them); 1 computes in this process.
        chunk_mb: memory one batched decomposition may take (float64 copies of a chunk of one
            layer's snapshots and their Gram matrices); a huge layer is decomposed in smaller
            chunks, down to one snapshot at a time.
        cache: keep decompositions in a sidecar file; ``cache_path`` overrides where.
    """

    svd: str = "exact"
    method: str = "gram"
    svd_dtype: str = "float32"
    kmax: int = 32
    oversample: int = 10
    power_iters: int = 6
    device: str = "cpu"
    jobs: int = 1
    chunk_mb: int = 512
    cache: bool = True
    cache_path: str | None = None

    def __post_init__(self) -> None:
        if self.svd not in ("exact", "approx"):
            raise ConfigError(expected("svd", "exact or approx", self.svd, "exact is default."))
        if self.method not in ("gram", "svd"):
            raise ConfigError(expected("method", "gram or svd", self.method, "gram is default."))
        if self.svd_dtype not in DTYPES:
            raise ConfigError(
                expected("svd_dtype", "float32 or float64", self.svd_dtype, "Use float32.")
            )
        for name in ("kmax", "jobs", "chunk_mb"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name), "Use e.g. 2."))
        for name in ("oversample", "power_iters"):
            object.__setattr__(
                self, name, non_negative_int(name, getattr(self, name), "Use e.g. 1.")
            )
        resolve_device(str(self.device), allow_auto=False)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the cached vectors."""
        return DTYPES[self.svd_dtype]

    def settings(self) -> dict:
        """What makes two caches interchangeable (device, jobs and chunk_mb do not)."""
        keep = ("svd", "svd_dtype", "kmax") + (
            ("oversample", "power_iters") if self.svd == "approx" else ("method",)
        )
        return {"cache_version": CACHE_VERSION, **{k: asdict(self)[k] for k in keep}}
