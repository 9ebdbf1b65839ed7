"""Shared by the benchmarks: interleaved repeats and the PASS/MISS verdict."""

from __future__ import annotations

import math
from collections.abc import Callable


def interleaved(
    runs: dict[str, Callable[[], float]], repeats: int, width: int = 26
) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, rotating the order every repeat (drift hits all)."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runs[name]())
            print(
                f"  repeat {r + 1}/{repeats} {name:<{width}s} {times[name][-1]:8.3f} s", flush=True
            )
    return times


def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    """PASS when ``ratio`` meets ``target``; a NaN ratio is a MISS."""
    if not math.isfinite(ratio):
        return "MISS"
    ok = ratio >= target if higher_is_better else ratio <= target
    return "PASS" if ok else "MISS"
