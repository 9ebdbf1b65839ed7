"""The Gram route of the engine against a float64 SVD oracle (plain numpy, written here), on both
sides of the line where it hands over to an SVD, and what batching and chunking may not change."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis.decompose import (
    GRAM,
    GRAM_COND,
    NONFINITE,
    SVD64,
    bases,
    chunk_size,
    decompose_batch,
    pair_values,
)
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

CONDS = [1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
SHAPES = [(64, 64), (200, 50)]


def designed(m: int, n: int, cond: float, seed: int) -> np.ndarray:
    """A float64 (m, n) matrix with random singular vectors and singular values log-spaced
    from 1 down to 1/cond."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * np.logspace(0, -math.log10(cond), n)) @ v.T


def oracle(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, s, Vt) of a float64 numpy SVD."""
    return np.linalg.svd(w.astype(np.float64), full_matrices=False)


def _engine_pair(wa: np.ndarray, wb: np.ndarray, kk: int, cfg: EngineConfig):
    """The engine's decompositions and pair values of two matrices stored in float64."""
    ws = torch.from_numpy(np.stack([wa, wb]))
    da, db = decompose_batch(ws, [0, 1], [0.0, 1.0], cfg, storage=torch.float64)
    ba = bases(wa, da, kk, "cpu", True)
    bb = bases(wb, db, kk, "cpu", True)
    return da, db, pair_values(ba, bb, wa.shape[1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cond", CONDS)
def test_both_routes_agree_with_a_float64_svd_on_designed_spectra(shape, cond) -> None:
    m, n = shape
    k = 5
    wa = designed(m, n, cond, seed=1)
    # a drift on the order of the smallest singular value: S well below 1 even at cond 1e8
    rng = np.random.default_rng(2)
    wb = wa + 3 / cond * rng.standard_normal((m, n)) / math.sqrt(m)
    da, db, got = _engine_pair(wa, wb, k, EngineConfig(kmax=k))
    want_route = GRAM if cond <= GRAM_COND / 10 else SVD64  # at 1e4 itself either may win
    if cond != GRAM_COND:
        assert da.route == want_route and db.route == want_route
    (ua, sa, vta), (ub, sb, vtb) = oracle(wa), oracle(wb)
    np.testing.assert_allclose(da.s, sa, rtol=0, atol=1e-6 * sa[0])
    np.testing.assert_allclose(db.s, sb, rtol=0, atol=1e-6 * sb[0])
    s_ref = float(np.sum((ua @ vta) * (ub @ vtb))) / n
    assert abs(got.S - s_ref) < 1e-6, (got.S, s_ref)
    assert got.S < 0.9999  # the pair is not trivially aligned
    o_left = float(np.sum((ua[:, :k].T @ ub[:, :k]) ** 2)) / k
    o_right = float(np.sum((vta[:k] @ vtb[:k].T) ** 2)) / k
    assert abs(got.left[k - 1] / k - o_left) < 1e-6
    assert abs(got.right[k - 1] / k - o_right) < 1e-6


def test_the_gram_route_alone_would_lose_the_basis_above_the_line() -> None:
    """Why there is a line: forced through the Gram route, S at cond 1e7 is off by more than
    1e-6, while at cond 1e3 it is not (the SVD route is not just a habit). The worst case seen
    (docs/analysis.md) crossed 1e-6 at cond 1e5; the line at 1e4 keeps a factor 10 from it."""
    errors = {}
    for cond in (1e3, 1e7):
        wa = designed(64, 64, cond, seed=0)
        wb = wa + 0.3 / cond * np.random.default_rng(4).standard_normal((64, 64)) / 8
        g = [torch.from_numpy(w.T @ w) for w in (wa, wb)]
        pol = []
        for w, gram in zip((wa, wb), g):
            lam, v = torch.linalg.eigh(gram)
            s = lam.clamp_min(0).sqrt().numpy()
            v = v.numpy()
            pol.append(w @ (v / s) @ v.T)
        (ua, _, vta), (ub, _, vtb) = oracle(wa), oracle(wb)
        s_ref = float(np.sum((ua @ vta) * (ub @ vtb))) / 64
        errors[cond] = abs(float(np.sum(pol[0] * pol[1])) / 64 - s_ref)
    assert errors[1e3] < 1e-8
    assert errors[1e7] > 1e-6, errors


def test_a_batch_gives_the_bits_of_one_snapshot_at_a_time() -> None:
    rng = np.random.default_rng(5)
    ws = rng.standard_normal((6, 40, 24)).astype(np.float32)
    cfg = EngineConfig()
    batch = decompose_batch(torch.from_numpy(ws), list(range(6)), [float(t) for t in range(6)], cfg)
    for t in range(6):
        (alone,) = decompose_batch(torch.from_numpy(ws[t : t + 1]), [t], [float(t)], cfg)
        np.testing.assert_array_equal(batch[t].s, alone.s)
        np.testing.assert_array_equal(batch[t].V, alone.V)
        assert batch[t].fro2 == alone.fro2 and batch[t].route == alone.route == GRAM


def test_nonfinite_and_zero_snapshots_in_a_batch_leave_the_others_alone() -> None:
    rng = np.random.default_rng(6)
    ws = rng.standard_normal((4, 30, 12)).astype(np.float32)
    ws[1, 3, 4] = np.nan
    ws[2] = 0.0
    cfg = EngineConfig()
    got = decompose_batch(torch.from_numpy(ws), [0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0], cfg)
    assert [d.route for d in got] == [GRAM, NONFINITE, SVD64, GRAM]
    assert np.isnan(got[1].s).all() and math.isnan(got[1].fro2)
    np.testing.assert_array_equal(got[2].s, 0.0)
    clean = decompose_batch(torch.from_numpy(ws[[0, 3]]), [0, 3], [0.0, 3.0], cfg)
    for mine, ref in zip((got[0], got[3]), clean):
        np.testing.assert_array_equal(mine.s, ref.s)
        np.testing.assert_array_equal(mine.V, ref.V)


def test_chunk_size_follows_chunk_mb_and_never_drops_below_one() -> None:
    assert chunk_size((1536, 384), EngineConfig(chunk_mb=1)) == 1
    big = chunk_size((1536, 384), EngineConfig(chunk_mb=512))
    # (m n + 2 n^2) float64 entries, three copies each, per snapshot
    per = (1536 * 384 + 2 * 384 * 384) * 24
    assert big == min(64, 512 * 2**20 // per)
    assert chunk_size((10, 10), EngineConfig()) == 64


# ---------------------------------------------------------------------- through analyze()
def _run(path: Path, mats: list[np.ndarray], view: LayerView) -> Path:
    with RunWriter.create(path, [view], model_class="Toy") as w:
        for t, mat in enumerate(mats):
            w.append(iter([mat.astype(np.float32)]), step=t, epoch=t)
    return path


@pytest.mark.parametrize("cond", [1e2, 1e5])
def test_analysis_of_float32_weights_matches_the_oracle_on_either_route(tmp_path, cond) -> None:
    view = LayerView.of("w", "w.weight", "linear", (120, 40))
    base = designed(120, 40, cond, seed=7)
    rng = np.random.default_rng(8)
    mats = [base + 0.2 / cond * t * rng.standard_normal(base.shape) / 11 for t in range(5)]
    path = _run(tmp_path / "run.h5", mats, view)
    report = analyze(path, AnalysisConfig(lag=2, k=4), EngineConfig(chunk_mb=1))
    stored = [m.astype(np.float32).astype(np.float64) for m in mats]
    svds = [oracle(m) for m in stored]
    for row in report.stability.itertuples():
        (ua, _, vta), (ub, _, vtb) = svds[row.a], svds[row.b]
        s_ref = float(np.sum((ua @ vta) * (ub @ vtb))) / 40
        assert abs(row.S - s_ref) < 1e-6, (row.pair, row.a, row.b, row.S, s_ref)
        o_ref = float(np.sum((ua[:, :4].T @ ub[:, :4]) ** 2)) / 4
        assert abs(row.O_left - o_ref) < 1e-6
    spectra = report.spectra
    for t, (_, s, _) in enumerate(svds):
        mine = spectra[spectra["snapshot"] == t]["sigma"].to_numpy()
        np.testing.assert_allclose(mine, s, rtol=0, atol=1e-6 * s[0])
    # same numbers from the SVD method, which shares nothing with the Gram route but the rules
    other = analyze(path, AnalysisConfig(lag=2, k=4), EngineConfig(method="svd", cache=False))
    np.testing.assert_allclose(other.stability["S"], report.stability["S"], atol=1e-6)


def test_the_cache_holds_no_basis_and_is_smaller_than_a_tall_run(tmp_path) -> None:
    view = LayerView.of("w", "w.weight", "linear", (512, 64))
    rng = np.random.default_rng(9)
    base = rng.standard_normal((512, 64))
    path = _run(tmp_path / "run.h5", [base + 0.01 * t * base for t in range(6)], view)
    analyze(path, AnalysisConfig(lag=2, k=4))
    import h5py

    from basis_stability.analysis.engine import default_cache_path

    cache = default_cache_path(path, EngineConfig())
    with h5py.File(cache, "r") as f:
        grp = f["layers/w"]
        assert set(grp) >= {"s", "V", "route", "pair_S"} and "B" not in grp and "U" not in grp
        assert grp["V"].shape == (6, 64, 64) and grp["V"].dtype == np.float32
    # V is n x n and the run m x n: an eighth of the run here, plus small per-snapshot data
    assert cache.stat().st_size < 0.25 * path.stat().st_size


@pytest.mark.parametrize("cond", [3e3, 8e3])
def test_ill_conditioned_snapshots_keep_float64_vectors_and_their_s_within_1e6(
    tmp_path, cond
) -> None:
    """Rounding V to float32 would move S by up to 3e-6 at cond 1e4 on 64 x 64 (measured), so
    above cond 1e3 V is cached in float64 (V64), and only there."""
    import h5py

    from basis_stability.analysis.engine import default_cache_path

    view = LayerView.of("w", "w.weight", "linear", (64, 64))
    worst, stored_wide = 0.0, []
    for seed in range(3):
        base = designed(64, 64, cond, seed).astype(np.float32).astype(np.float64)
        noise = np.random.default_rng(seed + 9).standard_normal((64, 64)) / 8
        mats = [base, base + 1e-3 * noise, base + 0.3 * noise]
        path = _run(tmp_path / f"run{seed}.h5", mats, view)
        report = analyze(path, AnalysisConfig(lag=1, k=4))
        stored = [m.astype(np.float32).astype(np.float64) for m in mats]
        svds = [oracle(m) for m in stored]
        for row in report.stability.itertuples():
            (ua, _, vta), (ub, _, vtb) = svds[row.a], svds[row.b]
            worst = max(worst, abs(row.S - float(np.sum((ua @ vta) * (ub @ vtb))) / 64))
        with h5py.File(default_cache_path(path, EngineConfig()), "r") as f:
            grp = f["layers/w"]
            conds = grp["s"][:, 0] / grp["s"][:, -1]
            stored_wide.append(
                all(
                    np.isfinite(grp["V64"][t]).all() == (c > 1e3)
                    and np.isnan(grp["V"][t]).all() == (c > 1e3)  # the float32 row never written
                    for t, c in enumerate(conds)
                )
            )
    assert worst < 1e-6, worst
    assert all(stored_wide)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_path_gives_the_numbers_of_the_cpu_path(tmp_path) -> None:
    """--device cuda runs the batched route on the GPU (batched eigh, bases, pairs there)."""
    view = LayerView.of("w", "w.weight", "linear", (256, 64))
    rng = np.random.default_rng(11)
    base = designed(256, 64, 1e2, seed=12)
    mats = [base + 0.01 * t * rng.standard_normal(base.shape) for t in range(6)]
    path = _run(tmp_path / "run.h5", mats, view)
    cfg = AnalysisConfig(lag=2, k=4)
    cpu = analyze(path, cfg, EngineConfig(cache=False))
    gpu = analyze(path, cfg, EngineConfig(cache=False, device="cuda"))
    for col in ("S", "O_left", "O_right"):
        np.testing.assert_allclose(gpu.stability[col], cpu.stability[col], atol=1e-7)
    np.testing.assert_allclose(gpu.spectra["sigma"], cpu.spectra["sigma"], rtol=1e-9)
