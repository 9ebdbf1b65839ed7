"""What analysis costs: ``analyze()`` against the bare SVDs it cannot avoid, and its fast paths.

A synthetic recording of a small transformer is written once (not timed): an embedding-like
1536x384 matrix, per block an attention ``in_proj`` (3E x E, E=128), ``out_proj`` (E x E) and an
MLP (4E x E and E x 4E, stored tall), plus a few 64x64 adapters; 20 matrices over 30 snapshots
(``--quick``: 11 matrices, 8 snapshots). Each matrix follows ``W_t = W_0 + sum_{j<=t} eta
gamma^j G_j / sqrt(m)``: ``W_0`` has a power-law spectrum (distinct top singular values, so the
top-k subspaces are defined) and the Gaussian drift shrinks geometrically, so S rises toward 1 as
in training.

Measured, in one process, interleaved (the order rotates every repeat), medians of ``--repeats``:

1. floor: bare ``torch.linalg.svd(w, full_matrices=False)`` on every (layer, snapshot) matrix in
   float32, all matrices loaded into memory first (untimed);
2. cold ``analyze()`` (exact mode, the Gram route, jobs=1, a fresh cache) / floor;
3. warm re-analysis (the same cache, nothing new to compute) / cold, and ``Report.computed == 0``;
4. cold with jobs=2 / cold with jobs=1 (fresh caches each);
5. approximate mode: the exact / approximate time of ``decompose_batch`` over every snapshot of
   the largest layer(s), and the approximate analysis' error against the exact one: O_k (k=8,
   left and right; all pairs where both are finite), the top-8 singular values (relative), and
   S, which the approximate mode does not compute (NaN by design: it needs every singular vector).

Where the cold time goes beyond the floor is measured inside the timed jobs=1 analysis itself by
wrapping, from this script, the engine's and the report's module-level functions with timers
(``fill_cache``, ``decompose_batch``, ``_by_svd``, ``SVDCache.put``, ``bases``, ``_build``); the
library code is not modified and the wrappers cost microseconds per matrix.

Run it on a quiet machine; ``--quick`` only checks that it works.

    python benchmarks/analyze_speed.py [--repeats 3] [--quick] [--snapshots N] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import basis_stability.analysis.cache as cache_mod
import basis_stability.analysis.decompose as decompose_mod
import basis_stability.analysis.pairs as pairs_mod
import basis_stability.analysis.report as report_mod
import basis_stability.store.reader as reader_mod
from basis_stability import analyze
from basis_stability.analysis.engine import EngineConfig
from basis_stability.analysis.report import AnalysisConfig, Report
from basis_stability.store.reader import open_run
from basis_stability.store.writer import RunWriter
from basis_stability.views import LayerView

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, verdict  # noqa: E402

TARGETS = {"cold": 0.6, "warm": 0.1, "jobs": 0.65, "approx_speed": 3.0, "approx_err": 1e-3}
K = 8  # top-k of the overlap and of the singular-value comparison
EMBED = 128  # E of the synthetic transformer


# ---------------------------------------------------------------- the recording
def transformer_layers(n_blocks: int, n_small: int) -> list[LayerView]:
    """The matrices of a small transformer, as the recorder would select them."""
    e = EMBED
    views = [LayerView.of("embed", "embed.weight", "embedding", (1536, 384))]
    for b in range(n_blocks):
        p = f"blocks.{b}"
        views += [
            LayerView.of(f"{p}.attn.in_proj", f"{p}.attn.in_proj_weight", "mha", (3 * e, e)),
            LayerView.of(f"{p}.attn.out_proj", f"{p}.attn.out_proj.weight", "linear", (e, e)),
            LayerView.of(f"{p}.mlp.fc1", f"{p}.mlp.fc1.weight", "linear", (4 * e, e)),
            LayerView.of(f"{p}.mlp.fc2", f"{p}.mlp.fc2.weight", "linear", (e, 4 * e)),
        ]
    views += [
        LayerView.of(f"adapter.{i}", f"adapter.{i}.weight", "linear", (64, 64))
        for i in range(n_small)
    ]
    return views


def initial_matrix(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A tall (m, n) matrix with random singular vectors and a power-law spectrum."""
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 3.0 * np.arange(1, n + 1) ** -0.8 + 0.05
    return (u * s) @ v.T


def trajectories(
    views: list[LayerView], n_snapshots: int, seed: int = 0, eta: float = 0.2, gamma: float = 0.9
) -> Iterator[list[np.ndarray]]:
    """Per snapshot, every layer's float32 matrix: ``W_0`` plus a geometrically shrinking drift."""
    rng = np.random.default_rng(seed)
    current = [initial_matrix(*v.shape, rng) for v in views]
    for t in range(n_snapshots):
        if t:
            step = eta * gamma ** (t - 1)
            for w in current:
                w += step * rng.standard_normal(w.shape) / math.sqrt(w.shape[0])
        yield [w.astype(np.float32) for w in current]


def write_run(path: Path, views: list[LayerView], n_snapshots: int) -> float:
    """Write the recording; returns its size in MB."""
    with RunWriter.create(path, views, model_class="SyntheticTransformer") as writer:
        for t, mats in enumerate(trajectories(views, n_snapshots)):
            writer.append(iter(mats), step=100 * t, epoch=float(t), metrics={"loss": 2 / (1 + t)})
    return path.stat().st_size / 1e6


# ---------------------------------------------------------------- phase timers
PHASES: dict[str, float] = defaultdict(float)


@contextlib.contextmanager
def timed_phases() -> Iterator[dict[str, float]]:
    """Wrap the engine's and the report's steps with timers (module globals; restored after)."""
    PHASES.clear()
    patches = [
        (report_mod, "fill_cache", "fill_cache"),
        (report_mod, "_build", "tables (_build)"),
        (decompose_mod, "decompose_batch", "decompose_batch"),
        (decompose_mod, "_by_svd", "svd route (_by_svd)"),
        (cache_mod.SVDCache, "put", "cache write (put)"),
        (pairs_mod, "bases", "bases rebuilt (B, U_k)"),
        (reader_mod, "open_run", "open_run per task"),  # decompose_task imports it per call
    ]
    originals = []
    for owner, attr, label in patches:
        original = getattr(owner, attr)
        originals.append((owner, attr, original))

        def wrapper(*args, _f=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                PHASES[_label] += time.perf_counter() - start

        setattr(owner, attr, wrapper)
    try:
        yield PHASES
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


# ---------------------------------------------------------------- the measurements
class Bench:
    """The timed variants; each returns seconds and keeps what the report table needs."""

    def __init__(self, folder: Path, run_path: Path, mats: list[tuple[str, torch.Tensor]]):
        self.folder, self.run_path, self.mats = folder, run_path, mats
        sizes = {name: w.numel() for name, w in mats}
        biggest = max(sizes.values())
        self.largest = [w for name, w in mats if sizes[name] == biggest]
        self.largest_names = sorted({name for name, w in mats if sizes[name] == biggest})
        self.counter = 0
        self.warm_cache: Path | None = None
        self.reports: dict[str, Report] = {}
        self.phases: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.computed: dict[str, list[int]] = defaultdict(list)
        self.floor_largest: list[float] = []
        self.tops: dict[str, list[np.ndarray]] = {}

    def _fresh_cache(self, tag: str) -> Path:
        self.counter += 1
        return self.folder / f"cache-{tag}-{self.counter}.h5"

    def _analyze(self, tag: str, cache: Path, **engine_kwargs) -> tuple[float, Report]:
        cfg = EngineConfig(cache_path=str(cache), **engine_kwargs)
        start = time.perf_counter()
        report = analyze(self.run_path, AnalysisConfig(k=K), cfg)
        seconds = time.perf_counter() - start
        self.computed[tag].append(report.computed)
        self.reports[tag] = report
        return seconds, report

    def floor(self) -> float:
        largest = 0.0
        start = time.perf_counter()
        for _, w in self.mats:
            t0 = time.perf_counter()
            torch.linalg.svd(w, full_matrices=False)
            if w.numel() == self.largest[0].numel():
                largest += time.perf_counter() - t0
        seconds = time.perf_counter() - start
        self.floor_largest.append(largest)
        return seconds

    def cold_j1(self) -> float:
        cache = self._fresh_cache("j1")
        with timed_phases() as phases:
            seconds, _ = self._analyze("cold j1", cache)
        self.phases["cold j1"].append({**phases, "total": seconds})
        if self.warm_cache is not None:  # keep only the newest jobs=1 cache, for the warm run
            self.warm_cache.unlink(missing_ok=True)
        self.warm_cache = cache
        return seconds

    def warm(self) -> float:
        with timed_phases() as phases:
            seconds, _ = self._analyze("warm", self.warm_cache)
        self.phases["warm"].append({**phases, "total": seconds})
        return seconds

    def cold_j2(self) -> float:
        cache = self._fresh_cache("j2")
        seconds, _ = self._analyze("cold j2", cache, jobs=2)
        cache.unlink()
        return seconds

    def approx(self) -> float:
        cache = self._fresh_cache("approx")
        seconds, _ = self._analyze("approx", cache, svd="approx")
        cache.unlink()
        return seconds

    def _decompose_largest(self, cfg: EngineConfig) -> float:
        tops = []
        start = time.perf_counter()
        for w in self.largest:
            tops.append(_decompose(w, cfg).s[:K])
        seconds = time.perf_counter() - start
        self.tops[cfg.svd] = tops
        return seconds

    def decompose_exact(self) -> float:
        return self._decompose_largest(EngineConfig())

    def decompose_approx(self) -> float:
        return self._decompose_largest(EngineConfig(svd="approx"))


def _decompose(w: torch.Tensor, cfg: EngineConfig):
    """One matrix through the engine's decomposition (a batch of one)."""
    return decompose_mod.decompose_batch(w[None], [0], [0.0], cfg)[0]


def _top_vectors(w: torch.Tensor, cfg: EngineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, U_K, V_K) of one matrix as the engine has them (exact mode rebuilds U_K)."""
    dec = _decompose(w, cfg)
    if cfg.svd == "approx":
        return dec.s, dec.U, dec.V
    b = decompose_mod.bases(w.numpy(), dec, K, "cpu", False)
    return dec.s, b.U.numpy(), b.V.numpy()


def approx_sweep(largest: list[torch.Tensor]) -> list[str]:
    """Accuracy and time of the approximate mode's settings on the largest layer (not a target:
    what the defaults would need to reach the exact mode's numbers)."""
    exact = [_top_vectors(w, EngineConfig()) for w in largest]
    lines = []
    for oversample, iters in ((10, 2), (10, 4), (10, 6), (20, 6)):
        cfg = EngineConfig(svd="approx", oversample=oversample, power_iters=iters)
        start = time.perf_counter()
        approx = [_top_vectors(w, cfg) for w in largest]
        seconds = time.perf_counter() - start
        sig = max(
            float(np.max(np.abs(a[0][:K] - e[0][:K]) / e[0][:K])) for a, e in zip(approx, exact)
        )
        # 1 - O_k between the approximate and the exact top-k subspace of the same snapshot
        miss = max(
            1 - float(np.sum((a[i][:, :K].T @ e[i][:, :K]) ** 2)) / K
            for a, e in zip(approx, exact)
            for i in (1, 2)
        )
        lines.append(
            f"oversample={oversample:<3d} power_iters={iters}: {seconds:6.3f} s, max rel. error "
            f"sigma_1..{K} {sig:.1e}, max 1 - O_{K}(approx, exact) (U and V) {miss:.1e}"
        )
    return lines


# ---------------------------------------------------------------- comparisons
def max_abs_diff(a: pd.DataFrame, b: pd.DataFrame, cols: list[str]) -> tuple[float, int]:
    """Largest |a - b| over ``cols`` on rows matched by (layer, pair, a, b) where both are finite,
    and how many values were compared."""
    keys = ["layer", "pair", "a", "b"]
    merged = a[keys + cols].merge(b[keys + cols], on=keys, suffixes=("_x", "_y"))
    worst, count = 0.0, 0
    for col in cols:
        x, y = merged[f"{col}_x"].to_numpy(float), merged[f"{col}_y"].to_numpy(float)
        both = np.isfinite(x) & np.isfinite(y)
        count += int(both.sum())
        if both.any():
            worst = max(worst, float(np.abs(x[both] - y[both]).max()))
    return (worst if count else math.nan), count


def top_sigma_rel_err(approx: pd.DataFrame, exact: pd.DataFrame) -> tuple[float, int]:
    """Largest relative error of sigma_1..sigma_K, over every layer and snapshot."""
    keys = ["layer", "snapshot", "i"]
    a, e = approx[approx["i"] <= K], exact[exact["i"] <= K]
    merged = a[keys + ["sigma"]].merge(e[keys + ["sigma"]], on=keys, suffixes=("_a", "_e"))
    err = (merged["sigma_a"] - merged["sigma_e"]).abs() / merged["sigma_e"].abs()
    return float(err.max()), len(merged)


def recording_summary(report: Report) -> str:
    """What the synthetic recording looks like to the analysis (is it realistic?)."""
    lag = report.stability[report.stability["pair"] == "lag"]
    if lag.empty:
        lag = report.stability[report.stability["pair"] == "consecutive"]
    by_b = lag.groupby("b")["S"].mean()
    spectra = report.spectra
    gaps = []
    for (_, _), grp in spectra[spectra["i"] <= K + 1].groupby(["layer", "snapshot"]):
        s = grp.sort_values("i")["sigma"].to_numpy()
        gaps.append((s[:-1] - s[1:]).min() / s[0])
    return (
        f"mean {lag['pair'].iloc[0]} S (lag {int(lag['lag'].iloc[0])}) at the first pair "
        f"{by_b.iloc[0]:.3f}, at the last {by_b.iloc[-1]:.4f}; smallest relative gap among "
        f"sigma_1..sigma_{K + 1}: {min(gaps):.2e}"
    )


# ---------------------------------------------------------------- driver
def machine_note() -> str:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", os.cpu_count()={os.cpu_count()}, usable cores={affinity}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads (jobs=1), "
        f"jobs=2 workers get os.cpu_count()//2 = {max(1, (os.cpu_count() or 1) // 2)} thread(s) "
        f"each; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def warm_up(folder: Path) -> float:
    """First-call costs off the clock; returns the one-off cost of the first jobs=2 call (the
    forkserver start with torch preloaded, paid by every new process, e.g. each CLI call)."""
    views = transformer_layers(0, 2)
    path = folder / "warmup.h5"
    write_run(path, views, 3)
    for tag, kwargs in (("a", {}), ("b", {"svd": "approx"})):
        analyze(path, AnalysisConfig(k=K), EngineConfig(cache_path=str(folder / f"{tag}.h5")))
        analyze(path, AnalysisConfig(k=K), EngineConfig(cache=False, **kwargs))
    start = time.perf_counter()
    analyze(path, AnalysisConfig(k=K), EngineConfig(cache=False, jobs=2))
    first = time.perf_counter() - start
    start = time.perf_counter()
    analyze(path, AnalysisConfig(k=K), EngineConfig(cache=False, jobs=2))
    return first - (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 3)")
    parser.add_argument("--quick", action="store_true", help="small recording: smoke test")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    args = parser.parse_args()
    repeats = args.repeats or 3
    n_snapshots = args.snapshots or (8 if args.quick else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    views = transformer_layers(*((2, 2) if args.quick else (4, 3)))

    with tempfile.TemporaryDirectory(prefix="bstab-bench-") as tmp:
        folder = Path(tmp)
        run_path = folder / "run.h5"
        start = time.perf_counter()
        mb = write_run(run_path, views, n_snapshots)
        shapes = sorted({v.shape for v in views}, key=lambda s: -s[0] * s[1])
        print(
            f"recording: {len(views)} matrices ({', '.join(f'{m}x{n}' for m, n in shapes)}), "
            f"{n_snapshots} snapshots, {mb:.0f} MB, written in {time.perf_counter() - start:.1f} s"
        )
        with open_run(run_path) as run:  # every matrix in memory, untimed
            mats = [
                (info.name, torch.from_numpy(np.ascontiguousarray(run.layer(info.name)[t])))
                for t in range(run.n_snapshots)
                for info in run.layers
            ]
        jobs2_start = warm_up(folder)
        bench = Bench(folder, run_path, mats)
        note = machine_note()
        print(f"{note}\n{repeats} repeats, interleaved:")
        times = interleaved(
            {
                "floor (bare SVDs)": bench.floor,
                "cold, jobs=1": bench.cold_j1,
                "warm, jobs=1": bench.warm,
                "cold, jobs=2": bench.cold_j2,
                "cold, approx": bench.approx,
                "decompose exact, largest": bench.decompose_exact,
                "decompose approx, largest": bench.decompose_approx,
            },
            repeats,
        )
        load_end = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
        sweep = approx_sweep(bench.largest)

    med = {k: statistics.median(v) for k, v in times.items()}
    exact, approx = bench.reports["cold j1"], bench.reports["approx"]
    o_err, o_count = max_abs_diff(approx.stability, exact.stability, ["O_left", "O_right"])
    s_known = int(approx.stability["S"].notna().sum())
    sig_err, sig_count = top_sigma_rel_err(approx.spectra, exact.spectra)
    tops = [np.abs(a - e) / np.abs(e) for a, e in zip(bench.tops["approx"], bench.tops["exact"])]
    warm_diff, _ = max_abs_diff(
        bench.reports["warm"].stability, exact.stability, ["S", "O_left", "O_right"]
    )
    j2_diff, _ = max_abs_diff(
        bench.reports["cold j2"].stability, exact.stability, ["S", "O_left", "O_right"]
    )
    warm_computed = bench.computed["warm"]
    cold_computed = bench.computed["cold j1"][0]

    print(f"\nwhat the analysis sees: {recording_summary(exact)}")
    print(
        f"sanity: cold computed {cold_computed} SVDs (= {len(mats)} matrices); warm computed "
        f"{warm_computed}; max |warm - cold| {warm_diff:.1e}, max |jobs=2 - jobs=1| "
        f"{j2_diff:.1e} (S, O_left, O_right)"
    )

    # where the cold time goes
    phase = {
        k: statistics.median(p.get(k, 0.0) for p in bench.phases["cold j1"])
        for k in bench.phases["cold j1"][0]
    }
    put = phase["cache write (put)"]
    reopen = phase.get("open_run per task", 0.0)
    fill, build = phase["fill_cache"], phase["tables (_build)"]
    dec, by_svd = phase["decompose_batch"], phase.get("svd route (_by_svd)", 0.0)
    rebuilt = phase.get("bases rebuilt (B, U_k)", 0.0)
    rows = [
        ("Gram route (decompose_batch without its SVD fallbacks)", dec - by_svd),
        ("float64 SVD fallbacks (cond > 1e4 or near rank-deficient)", by_svd),
        ("cache write (SVDCache.put)", put),
        ("re-opening the run in every task (open_run in decompose_task)", reopen),
        ("read snapshots + bookkeeping (rest of fill_cache)", fill - dec - put - reopen),
        ("bases rebuilt from weights and V (B, U_k)", rebuilt),
        ("rest of tables (_build: pairs, spectra, plan)", build - rebuilt),
        ("other (open the run, open/close the cache)", phase["total"] - fill - build),
    ]
    print(
        f"\nwhere the cold jobs=1 time goes (medians; total {phase['total']:.3f} s, "
        f"floor {med['floor (bare SVDs)']:.3f} s):"
    )
    for label, seconds in rows:
        print(
            f"  {label:<64s} {seconds:8.3f} s  {100 * seconds / phase['total']:5.1f} %  "
            f"{seconds / med['floor (bare SVDs)']:6.3f} x floor"
        )
    wp = {
        k: statistics.median(p.get(k, 0.0) for p in bench.phases["warm"])
        for k in bench.phases["warm"][0]
    }
    print(
        f"warm: total {wp['total']:.3f} s = fill_cache (cache checks) {wp['fill_cache']:.3f} s"
        f" + tables {wp['tables (_build)']:.3f} s"
        f" + other {wp['total'] - wp['fill_cache'] - wp['tables (_build)']:.3f} s"
    )

    floor, cold = med["floor (bare SVDs)"], med["cold, jobs=1"]
    warm, j2 = med["warm, jobs=1"], med["cold, jobs=2"]
    dec_e, dec_a = med["decompose exact, largest"], med["decompose approx, largest"]
    warm_ok = all(c == 0 for c in warm_computed)
    table = [
        ("SVD floor: bare torch.linalg.svd, all", f"{floor:.3f} s", "", "", ""),
        (
            "cold analyze, exact (Gram route), jobs=1",
            f"{cold:.3f} s",
            f"{cold / floor:.3f}",
            f"<= {TARGETS['cold']:.2f} x floor",
            verdict(cold / floor, TARGETS["cold"], False),
        ),
        (
            f"warm re-analyze (computed={max(warm_computed)})",
            f"{warm:.3f} s",
            f"{warm / cold:.3f}",
            f"<= {TARGETS['warm']:.2f} x cold, computed=0",
            verdict(warm / cold if warm_ok else math.nan, TARGETS["warm"], False),
        ),
        (
            "cold analyze, jobs=2",
            f"{j2:.3f} s",
            f"{j2 / cold:.3f}",
            f"<= {TARGETS['jobs']:.2f} x jobs=1",
            verdict(j2 / cold, TARGETS["jobs"], False),
        ),
        (
            f"decompose largest ({', '.join(bench.largest_names)}), exact",
            f"{dec_e:.3f} s",
            "",
            "",
            "",
        ),
        (
            "decompose largest, approx (speed-up)",
            f"{dec_a:.3f} s",
            f"{dec_e / dec_a:.2f}x",
            f">= {TARGETS['approx_speed']:.0f}x faster",
            verdict(dec_e / dec_a, TARGETS["approx_speed"], True),
        ),
        (
            f"approx: max |O_{K} error| (L+R, {o_count} values)",
            f"{o_err:.2e}",
            "",
            f"<= {TARGETS['approx_err']:.0e}",
            verdict(-o_err, -TARGETS["approx_err"], True),
        ),
        (
            f"approx: S error ({s_known} S values known)",
            "n/a (S needs the full SVD)",
            "",
            f"<= {TARGETS['approx_err']:.0e}",
            "MISS (S is NaN in approx mode by design)",
        ),
        (f"approx: max rel. error sigma_1..{K} ({sig_count})", f"{sig_err:.2e}", "", "", ""),
        (
            "cold analyze, approx (whole run)",
            f"{med['cold, approx']:.3f} s",
            f"{med['cold, approx'] / cold:.3f}",
            "(x exact cold; no target)",
            "",
        ),
    ]
    header = ("measure (median)", "value", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print()
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(
        f"\nfloor of the largest layer alone: {statistics.median(bench.floor_largest):.3f} s; "
        f"approx top-{K} rel. error on it (direct decompose_batch): "
        f"{max(float(t.max()) for t in tops):.2e}"
    )
    print(
        f"the first jobs=2 call of a process also starts the forkserver (torch preloaded): "
        f"+{jobs2_start:.2f} s once, not in the medians (each CLI call pays it)"
    )
    print(f"approx settings on the largest layer ({len(bench.largest)} matrices, one run each):")
    for line in sweep:
        print(f"  {line}")
    print(note.replace("load average", "load average at the start"))
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if args.quick:
        print("\n--quick: too small a recording and too few repeats for the ratios to mean much.")


if __name__ == "__main__":
    sys.exit(main())
