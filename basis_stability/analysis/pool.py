"""Driving the decompositions: the (layer, snapshots) tasks a cache lacks, computed in this
process or spread over worker processes (``jobs``), their results written into the cache."""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from ..store.reader import Run
from .cache import SVDCache
from .config import EngineConfig
from .decompose import Decomposition, chunk_size, decompose_snapshots

_TASK = 8  # at most this many snapshots per task: bounds what a worker sends back at once


def pending_tasks(run: Run, cache: SVDCache, available: dict[str, int]) -> list:
    """``(run path, layer, snapshot indices, their commit times)`` for what the cache lacks;
    one process takes a whole memory-bounded chunk per task, workers smaller ones."""
    cfg = cache.cfg
    t_ids = run.index()["unix_time"]
    tasks = []
    for info in run.layers:
        todo = cache.missing(info, t_ids[: available[info.name]])
        size = max(_TASK, chunk_size(info.shape, cfg)) if cfg.jobs == 1 else _TASK
        for i in range(0, len(todo), size):
            chunk = todo[i : i + size]
            tasks.append((str(run.path), info.name, chunk, [float(t_ids[t]) for t in chunk]))
    return tasks


def decompose_task(
    path: str, name: str, indices: list[int], t_ids: list[float], cfg: EngineConfig
) -> tuple[str, list[Decomposition]]:
    """:func:`~.decompose.decompose_snapshots` in a worker process, which opens the run itself."""
    from ..store.reader import open_run

    with open_run(path) as run:
        return name, decompose_snapshots(run.layer(name), indices, t_ids, cfg)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def fill_cache(
    run: Run, cache: SVDCache, cfg: EngineConfig, available: dict[str, int], progress: bool = False
) -> int:
    """Decompose every snapshot the cache lacks; returns how many were computed."""
    from tqdm.auto import tqdm

    tasks = pending_tasks(run, cache, available)
    total = sum(len(t[2]) for t in tasks)
    if not total:
        return 0
    infos = {i.name: i for i in run.layers}
    bar = tqdm(total=total, desc="decompose", unit="matrix", disable=not progress)
    if cfg.jobs == 1 or len(tasks) == 1:
        for _, name, indices, t_ids in tasks:  # in this process, on the run already open
            entries = decompose_snapshots(run.layer(name), indices, t_ids, cfg)
            cache.put(infos[name], entries)
            bar.update(len(entries))
    else:
        import multiprocessing as mp

        threads = max(1, len(os.sched_getaffinity(0)) // cfg.jobs)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "h5py", "basis_stability.analysis.decompose"])
        # largest layers first: they bound the wall time
        tasks.sort(key=lambda t: -math.prod(infos[t[1]].shape) * len(t[2]))
        with ProcessPoolExecutor(
            cfg.jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(decompose_task, *task, cfg) for task in tasks]
            for fut in as_completed(futures):
                name, entries = fut.result()
                cache.put(infos[name], entries)
                bar.update(len(entries))
    bar.close()
    return total
