"""What the float64 promotion of ill-conditioned layers costs (issue 11, point 1).

``decompose`` computes each matrix's SVD in float32 and redoes it in float64 when the condition
number exceeds ``PROMOTE_COND`` (1e3) or the smallest singular value is near the rank tolerance.
This measures, side by side in one process, the median time of ``decompose`` on a matrix of a
given shape with condition number 1e2 (float32 only) and 1e5 (float32, then float64), and the
ratio: the extra cost a run pays per promoted (layer, snapshot).

    python benchmarks/promotion_cost.py [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from basis_stability.analysis.stability import decompose


def designed(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """An m x n float32 matrix with log-spaced singular values from 1 down to 1/cond."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def medians(mats: list[torch.Tensor], repeats: int) -> list[float]:
    """Median seconds of ``decompose`` per matrix, interleaved so that load hits all alike."""
    for w in mats:
        decompose(w)  # warm-up
    times: list[list[float]] = [[] for _ in mats]
    for _ in range(repeats):
        for i, w in enumerate(mats):
            start = time.perf_counter()
            decompose(w)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = [(128, 128), (256, 64)] if args.quick else [(256, 256), (512, 512), (1024, 256)]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, medians of {args.repeats}")
    print(f"{'shape':>10} {'cond 1e2 (ms)':>14} {'cond 1e5 (ms)':>14} {'promoted / not':>15}")
    for m, n in shapes:
        fast, slow = medians([designed(m, n, 1e2), designed(m, n, 1e5)], args.repeats)
        print(f"{m}x{n:<6} {1e3 * fast:14.2f} {1e3 * slow:14.2f} {slow / fast:15.2f}")


if __name__ == "__main__":
    main()
