"""Analysis over several processes: ``torchrun --nproc_per_node=N -m basis_stability analyze RUN``.

The decompositions are most of the cost of an analysis, so they are what is spread: rank 0 lists
the (layer, snapshots) tasks its cache lacks and broadcasts them; each task goes to one rank
(largest first, to the least-loaded rank: deterministic, so every rank agrees without talking);
each rank decomposes its tasks from the run file it opens itself, one task per round, and rank 0
gathers a round's results and writes them into the cache. Rank 0 then builds the report from the
cache as a single process would (it also measures the pairs, from the cached vectors), so the
result is the single-process result: the same function on the same float32 input gives the same
bits on any rank (LAPACK with the same thread count; torchrun sets one thread per process unless
OMP_NUM_THREADS says otherwise).

Objects travel over a gloo group (a CPU transport), whatever backend the job uses otherwise; with
``--device cuda`` each rank decomposes on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or a similar launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes (gloo), unless already in one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


def _group():
    """A gloo group for Python objects (NCCL cannot carry them without a device per rank)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each task: largest first, each to the least-loaded rank (ties: lowest rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def rank_device(device: str) -> str:
    """``cuda`` becomes this rank's own GPU (``cuda:LOCAL_RANK`` modulo the GPUs present)."""
    if device != "cuda":
        return device
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local % max(torch.cuda.device_count(), 1)}"


def fill_cache_sharded(run, cache, cfg, available: dict[str, int], progress: bool = False) -> int:
    """:func:`~basis_stability.analysis.engine.fill_cache` across the ranks of the process group.

    Every rank must call it. Returns the number of decompositions computed (on every rank).
    """
    import dataclasses

    import torch.distributed as dist
    from tqdm.auto import tqdm

    from . import engine

    rank, world = dist.get_rank(), dist.get_world_size()
    group = _group()
    box: list[Any] = [engine.pending_tasks(run, cache, available) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    tasks = box[0]
    total = sum(len(t[2]) for t in tasks)
    if not total:
        return 0
    if max(t for task in tasks for t in task[2]) >= run.n_snapshots:
        run.refresh()  # a live run: rank 0 listed commits made after this rank opened it
    infos = {i.name: i for i in run.layers}
    costs = [math.prod(infos[t[1]].shape) * len(t[2]) for t in tasks]
    owner = assign(costs, world)
    mine = [t for t, r in zip(tasks, owner) if r == rank]
    rounds = max(owner.count(r) for r in range(world))
    local_cfg = dataclasses.replace(cfg, device=rank_device(cfg.device), jobs=1)
    bar = tqdm(
        total=total, desc=f"SVD x{world} ranks", unit="matrix", disable=bool(rank) or not progress
    )
    for i in range(rounds):
        result = None
        if i < len(mine):
            _, name, indices, t_ids = mine[i]
            result = (name, engine.decompose_snapshots(run.layer(name), indices, t_ids, local_cfg))
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(result, gathered, dst=0, group=group)
        if rank == 0:
            for item in gathered:
                if item is not None:
                    cache.put(infos[item[0]], item[1])
                    bar.update(len(item[1]))
    bar.close()
    return total
