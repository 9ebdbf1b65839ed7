"""Recording a model sharded by FSDP2: its DTensor parameters gathered onto rank 0, one at a time.

Under ``torch.distributed`` only global rank 0 writes the run; every rank joins each gather, so
the whole model is never materialised on one rank. FSDP1's flat parameters hold no layer
matrices and are refused (:func:`refuse_fsdp1`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _dist
from ..errors import ConfigError


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2), without importing it."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise :class:`ConfigError` for a model wrapped in FSDP1 (``FullyShardedDataParallel``)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ConfigError(
            "Expected a model whose layers keep their own weights but got one wrapped in "
            "FullyShardedDataParallel (FSDP1), whose flat parameters hold no layer matrices. "
            "Shard with torch.distributed.fsdp.fully_shard (FSDP2) instead: the recorder "
            "gathers its layers one at a time onto rank 0."
        )


def gather_to_rank0(weight: Any) -> torch.Tensor | None:
    """The full value of a sharded (DTensor) parameter on global rank 0, None on other ranks.

    A parameter sharded along dim 0 over a 1-D mesh (FSDP2's layout) is gathered to rank 0 only:
    each rank sends its shard, padded to a common size, and only rank 0 holds the full matrix.
    Other layouts fall back to ``full_tensor()`` (an all-gather: every rank holds this one layer
    for a moment). Every rank of the mesh must call this.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    local = weight.to_local().detach()
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        full = weight.full_tensor().detach()
        return full if _dist.is_writer() else None
    group = mesh.get_group()
    size = dist.get_world_size(group)
    rows = weight.shape[0]
    chunk = -(-rows // size)  # torch.chunk's split: ceil(rows / size) rows per rank
    padded = local.new_zeros((chunk, *weight.shape[1:]))
    padded[: local.shape[0]] = local
    dst = dist.get_global_rank(group, 0)
    gathered = [torch.empty_like(padded) for _ in range(size)] if _dist.rank() == dst else None
    dist.gather(padded, gathered, dst=dst, group=group)
    if _dist.rank() != dst:
        return None
    return torch.cat(gathered)[:rows]
