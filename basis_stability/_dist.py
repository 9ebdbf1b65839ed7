"""torch.distributed helpers: who writes files."""

from __future__ import annotations


def rank() -> int:
    """This process's global rank, 0 when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """Processes in the default group, 1 when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_writer() -> bool:
    """Only global rank 0 writes run files; every other rank is a no-op."""
    return rank() == 0


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (the value itself without torch.distributed)."""
    import torch.distributed as dist

    if world_size() < 2:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
