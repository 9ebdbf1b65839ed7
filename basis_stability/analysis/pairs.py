"""Measuring pairs of snapshots of one layer: S and the cumulative top-k overlaps.

A pair already in the cache (keyed by the commit times of both snapshots) is read back; the
others are measured from bases rebuilt from the run's weights and the cached ``V``
(:func:`~.decompose.bases`), each snapshot's bases built once and dropped as soon as its last
pending pair is measured, so memory holds only the snapshots the lag window and the two anchors
(the first and the final snapshot) keep alive. The new pairs go into the cache.
"""

from __future__ import annotations

from collections import Counter

from ..store.reader import LayerInfo, Run
from .cache import SVDCache
from .config import EngineConfig
from .decompose import Bases, Decomposition, PairValues, bases, pair_values


def _order(pair: tuple[int, int], final: int) -> int:
    """When a pair is measured: at its later snapshot, except the pairs with the final snapshot,
    which are measured with their earlier one (the final snapshot's bases stay alive instead of
    every earlier snapshot's)."""
    a, b = pair
    return min(a, b) if max(a, b) == final else max(a, b)


def measure_pairs(
    run: Run,
    info: LayerInfo,
    cache: SVDCache,
    decs: list[Decomposition | None],
    pairs: list[tuple[int, int]],
    basis: list[bool],
    cfg: EngineConfig,
) -> tuple[dict[tuple[int, int], PairValues], int]:
    """S and cumulative overlaps of ``pairs`` of one layer.

    Args:
        decs: the layer's decompositions (None: the layer is missing from that snapshot).
        pairs: ``(a, b)`` snapshot indices.
        basis: per snapshot, whether its basis is defined (S is NaN otherwise).

    Returns:
        The values per pair (pairs with a missing snapshot are left out) and how many pairs were
        measured rather than read from the cache.
    """
    cached = cache.pairs(info)
    out: dict[tuple[int, int], PairValues] = {}
    todo = []
    for a, b in dict.fromkeys(pairs):
        if decs[a] is None or decs[b] is None:
            continue
        hit = cached.get((decs[a].t_id, decs[b].t_id))
        if hit is not None:
            out[(a, b)] = hit
        else:
            todo.append((a, b))
    if not todo:
        return out, 0
    final = len(decs) - 1
    todo.sort(key=lambda p: (_order(p, final), p))
    left = Counter(t for p in todo for t in p)
    snaps = run.layer(info.name)
    kk = min(cfg.kmax, info.shape[1])
    n = min(info.shape)
    live: dict[int, Bases] = {}

    def get(t: int) -> Bases:
        if t not in live:
            dec = cache.vectors(info, decs[t])
            w = None if cfg.svd == "approx" else snaps[t]
            live[t] = bases(w, dec, kk, cfg.device, basis[t])
        return live[t]

    new = {}
    for a, b in todo:
        values = pair_values(get(a), get(b), n)
        out[(a, b)] = values
        new[(decs[a].t_id, decs[b].t_id)] = values
        for t in (a, b):
            left[t] -= 1
            if not left[t]:
                live.pop(t, None)
    cache.put_pairs(info, new)
    return out, len(todo)
