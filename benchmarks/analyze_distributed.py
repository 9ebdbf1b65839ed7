"""Sharded analysis under torchrun against one process: wall time and exact equality.

The recording is the synthetic transformer of ``analyze_speed.py`` (20 matrices, 64x64 to
1536x384). Three whole ``bstab analyze --no-cache`` commands, each a fresh process (so process
start, imports and, for torchrun, the rendezvous are counted), run interleaved:

- ``single``: one process with torch's default threads (all cores);
- ``single-1t``: one process with OMP_NUM_THREADS=1, the reference of the equality check;
- ``torchrun``: ``torchrun --nproc_per_node=N -m basis_stability analyze`` (one thread per rank).

It prints the medians, the ratios and whether the sharded CSVs and plan.json equal the one-thread
single process's byte for byte. There is no speed target: on a machine with few cores one process
already runs LAPACK on all of them, so sharding can only win where ranks bring their own cores or
GPUs. Run: ``python benchmarks/analyze_distributed.py [--repeats 3] [--nproc 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved  # noqa: E402
from analyze_speed import transformer_layers, write_run  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(kind: str, run: Path, out: Path, nproc: int) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE")}
    tail = ["analyze", str(run), "-o", str(out), "--no-plots", "--no-cache", "--no-progress"]
    if kind == "single":
        return [sys.executable, "-m", "basis_stability", *tail], env
    env["OMP_NUM_THREADS"] = "1"
    if kind == "single-1t":
        return [sys.executable, "-m", "basis_stability", *tail], env
    env["GLOO_SOCKET_IFNAME"] = "lo"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return [*launcher, "-m", "basis_stability", *tail], env


def _timed(kind: str, run: Path, out: Path, nproc: int) -> float:
    cmd, env = _command(kind, run, out, nproc)
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{kind} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed


def _same(a: Path, b: Path) -> tuple[bool, list[str]]:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".csv", ".json"))
    differ = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    return not differ and bool(names), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small recording: smoke test")
    args = parser.parse_args()
    views = transformer_layers(*((2, 2) if args.quick else (4, 3)))
    n_snapshots = 8 if args.quick else 30
    with tempfile.TemporaryDirectory(prefix="bstab-bench-dist-") as tmp:
        folder = Path(tmp)
        run = folder / "run.h5"
        size = write_run(run, views, n_snapshots)
        print(
            f"recording: {len(views)} matrices x {n_snapshots} snapshots ({size:.0f} MB); "
            f"{os.cpu_count()} CPUs; torchrun with {args.nproc} ranks",
            flush=True,
        )
        kinds = ("single", "single-1t", "torchrun")
        runs = {k: (lambda k=k: _timed(k, run, folder / k, args.nproc)) for k in kinds}
        times = interleaved(runs, args.repeats, width=10)
        med = {k: statistics.median(v) for k, v in times.items()}
        same, differ = _same(folder / "single-1t", folder / "torchrun")
        print()
        print(f"{'command (median of ' + str(args.repeats) + ')':<44}{'seconds':>9}{'ratio':>9}")
        print(f"{'bstab analyze, one process, all threads':<44}{med['single']:>9.2f}{1:>9.2f}")
        print(
            f"{'bstab analyze, one process, 1 thread':<44}{med['single-1t']:>9.2f}"
            f"{med['single-1t'] / med['single']:>9.2f}"
        )
        print(
            f"{f'torchrun, {args.nproc} ranks x 1 thread':<44}{med['torchrun']:>9.2f}"
            f"{med['torchrun'] / med['single']:>9.2f}"
        )
        print(
            f"\ntorchrun ÷ one process at 1 thread: {med['torchrun'] / med['single-1t']:.2f}; "
            f"sharded tables and plan.json equal the 1-thread single process byte for byte: "
            f"{'PASS' if same else 'FAIL ' + ', '.join(differ)}"
        )


if __name__ == "__main__":
    main()
