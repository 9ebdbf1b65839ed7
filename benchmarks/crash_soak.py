"""SIGKILL soak: kill a recording process at random instants and check every run it leaves.

Each trial runs ``tests/helpers/record_forever.py`` in a subprocess, SIGKILLs it a seeded random
time (uniform in ``--delay``) after it is ready, and checks the file as ``tests/test_crash.py``
does: it opens, holds every snapshot reported done (plus at most the one in flight) and each
committed snapshot holds exactly its expected values. Prints survived/total and where the kills
landed. Exit status 1 when any trial failed.

    python benchmarks/crash_soak.py [--trials 30] [--seed 0] [--delay 0.2 1.0]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from crash_trial import kill_trial, verify_trial  # noqa: E402
from record_forever import DEFAULT_SIZES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="trial i uses seed + i")
    parser.add_argument("--delay", type=float, nargs=2, default=(0.2, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="Linear widths of the model")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so no writer subprocess is orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    kill_points: collections.Counter[str] = collections.Counter()
    failures = []
    committed = []
    start = time.perf_counter()
    for i in range(args.trials):
        seed = args.seed + i
        folder = Path(tempfile.mkdtemp(prefix="bstab-soak-"))
        try:
            path = folder / "run.h5"
            result = kill_trial(path, seed, tuple(args.delay), args.sizes)
            kill_points[result.kill_point] += 1
            committed.append(result.committed)
            verify_trial(result, path, args.sizes)
            verdict = "ok"
        except Exception as exc:  # a failed trial is a finding, not a crash of the soak
            failures.append((seed, f"{type(exc).__name__}: {exc}"))
            verdict = "FAILED"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"trial {i + 1:3d}/{args.trials} seed {seed}: {verdict}", flush=True)

    survived = args.trials - len(failures)
    print()
    print(f"survived: {survived}/{args.trials}  ({time.perf_counter() - start:.0f} s)")
    if committed:
        print(f"snapshots committed per trial: min {min(committed)}, max {max(committed)}")
    print("where the kills landed:")
    for point, count in kill_points.most_common():
        print(f"  {point:<50s} {count:3d}")
    mid = sum(c for p, c in kill_points.items() if p.startswith("in snapshot"))
    print(f"  {'mid-snapshot (all kinds)':<50s} {mid:3d}")
    for seed, message in failures:
        print(f"FAILED seed {seed}: {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
