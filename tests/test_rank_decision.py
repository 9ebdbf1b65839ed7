"""The rank decision behind S = NaN (issue 11): S is NaN only when the stored matrix cannot be told
from a rank-deficient one; every other matrix, however ill-conditioned, gets S within 1e-5 of a
float64 NumPy oracle of the *stored* matrix, with its condition number and an error bound beside
it, and the plan names (and excludes) layers whose S is NaN instead of calling them unstable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis.stability import (
    PROMOTE_COND,
    basis_reason,
    decompose,
    polar_svd,
    stability,
    stability_bound,
)
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

F32, F64 = torch.float32, torch.float64
CONDS = [1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
SHAPES = [(64, 64), (96, 40)]
U32 = np.finfo(np.float32).eps / 2


def _orthonormal(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, n)))
    return q * np.sign(np.diag(r))


def designed(rng: np.random.Generator, shape: tuple[int, int], s: np.ndarray) -> np.ndarray:
    """``U diag(s) V^T`` with random orthogonal U, V, built in float64."""
    m, n = shape
    return (_orthonormal(rng, m, n) * s) @ _orthonormal(rng, n, n).T


def log_spectrum(n: int, cond: float, top: float = 1.0) -> np.ndarray:
    return top * np.logspace(0, -np.log10(cond), n)


def oracle_polar(w32: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(w32.astype(np.float64), full_matrices=False)
    return u @ vt


def oracle_s(wa32: np.ndarray, wb32: np.ndarray) -> float:
    return float((oracle_polar(wa32) * oracle_polar(wb32)).sum() / wa32.shape[1])


def oracle_unique(w32: np.ndarray) -> bool:
    """Full column rank as far as float32 storage can tell, from float64 singular values."""
    s = np.linalg.svd(w32.astype(np.float64), compute_uv=False)
    tol = max(U32 * np.linalg.norm(s), max(w32.shape) * np.finfo(np.float64).eps * s[0])
    return bool(s[-1] > tol)


def _pair(cond: float, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    wa = designed(rng, shape, log_spectrum(shape[1], cond))
    near = wa + 1e-4 * rng.standard_normal(shape) / math.sqrt(shape[0])  # a training step
    far = designed(rng, shape, log_spectrum(shape[1], cond))  # an unrelated matrix
    return tuple(x.astype(np.float32) for x in (wa, near, far))


# ---------------------------------------------------------------------- S against the oracle
@pytest.mark.parametrize("dtype", [F32, F64], ids=["svd32", "svd64"])
@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall"])
@pytest.mark.parametrize("cond", CONDS)
def test_designed_condition_numbers_match_the_float64_oracle(
    cond: float, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    wa, near, far = _pair(cond, shape, seed=int(math.log10(cond)))
    decs = [decompose(torch.from_numpy(w), dtype) for w in (wa, near, far)]
    for w, d in zip((wa, near, far), decs):
        assert (d.basis is not None) == oracle_unique(w), (cond, d.reason)
        if d.basis is None:
            assert "rank-deficient" in d.reason and "float32" in d.reason
    if cond <= 1e6:  # s_min is far above the float32 rounding: the basis must be unique
        assert all(d.basis is not None for d in decs)
    for (x, dx), (y, dy) in (((wa, decs[0]), (near, decs[1])), ((wa, decs[0]), (far, decs[2]))):
        got = stability(dx, dy)
        if dx.basis is None or dy.basis is None:
            assert math.isnan(got.value) and "rank-deficient" in got.reason
            continue
        want = oracle_s(x, y)
        assert got.reason is None
        assert got.value == pytest.approx(want, abs=1e-5)
        bound = stability_bound(dx, dy)
        assert abs(got.value - want) <= bound + 1e-12  # the bound holds, and is not vacuous:
        assert bound < (1e-3 if cond <= 1e4 else 1.0)


def test_ill_conditioned_matrices_are_decomposed_in_float64() -> None:
    rng = np.random.default_rng(0)
    mild = designed(rng, (40, 20), log_spectrum(20, PROMOTE_COND / 10)).astype(np.float32)
    ill = designed(rng, (40, 20), log_spectrum(20, PROMOTE_COND * 10)).astype(np.float32)
    assert polar_svd(torch.from_numpy(mild), F32)[1] == F32
    svd, computed = polar_svd(torch.from_numpy(ill), F32)
    assert computed == F64 and svd.S.dtype == F64


# ---------------------------------------------------------------------- genuinely undefined
@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall"])
def test_an_exact_zero_singular_value_keeps_nan_with_its_reason(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    s = log_spectrum(shape[1], 1e2)
    s[-1] = 0.0
    w = designed(rng, shape, s).astype(np.float32)  # rounding leaves s_min ~ 1e-8, not 0
    other = designed(rng, shape, log_spectrum(shape[1], 10)).astype(np.float32)
    for dtype in (F32, F64):
        bad, good = decompose(torch.from_numpy(w), dtype), decompose(torch.from_numpy(other), dtype)
        assert bad.basis is None
        assert f"numerical rank {shape[1] - 1} < {shape[1]}" in bad.reason
        m = stability(bad, good)
        assert math.isnan(m.value) and "rank-deficient" in m.reason
        assert math.isnan(stability_bound(bad, good))


def test_a_zero_matrix_keeps_nan_with_its_reason() -> None:
    zero = decompose(torch.zeros(30, 10))
    assert zero.basis is None and "zero matrix" in zero.reason


def test_the_tolerance_follows_the_storage_precision() -> None:
    """s_min = 1e-5 s_1 is full rank in float32 storage, noise in float16 or bfloat16 storage."""
    s = torch.from_numpy(np.concatenate([np.ones(15), [1e-5]]))
    assert basis_reason(s, (40, 16), F32) is None
    for storage in (torch.float16, torch.bfloat16):
        reason = basis_reason(s, (40, 16), storage)
        assert "rank-deficient" in reason and str(storage).removeprefix("torch.") in reason


# ---------------------------------------------------------------------- through analyze()
NO_CACHE = EngineConfig(cache=False)


def _write(path: Path, layers: list[LayerView], snaps: list[list[np.ndarray]]) -> Path:
    with RunWriter.create(path, layers, model_class="MLP") as w:
        for t, mats in enumerate(snaps):
            w.append(iter(mats), step=10 * t, epoch=float(t))
    return path


def _settling(rng, w0: np.ndarray, count: int, first: float = 1e-3) -> list[np.ndarray]:
    """Snapshots whose steps (spectral norm about ``2 first``) shrink ten-fold: B settles."""
    out, w = [], w0.copy()
    for t in range(count):
        w = w + first * 10.0**-t * rng.standard_normal(w0.shape) / math.sqrt(w0.shape[0])
        out.append(w.astype(np.float32))
    return out


def test_bug_256x256_hidden_layer_cond_7e4_in_float32_gets_finite_s_and_no_not_stable_plan(
    tmp_path: Path,
) -> None:
    """Issue 11: s_min 5.97e-5, cond 7.6e4, float32 storage and the default float32 engine."""
    rng = np.random.default_rng(11)
    hidden = designed(rng, (256, 256), log_spectrum(256, 7.6e4, top=7.6e4 * 5.97e-5))
    head = designed(rng, (64, 10), log_spectrum(10, 5.0))
    # steps well below s_min keep the condition number (a larger one would change the spectrum)
    hs, ws = _settling(rng, hidden, 7, first=1e-6), _settling(rng, head, 7)
    layers = [
        LayerView.of("hidden", "hidden.weight", "linear", (256, 256)),
        LayerView.of("head", "head.weight", "linear", (10, 64)),
    ]
    path = _write(tmp_path / "mlp.h5", layers, [[h, w] for h, w in zip(hs, ws)])
    report = analyze(path, AnalysisConfig(lag=2), NO_CACHE)
    mine = report.stability[report.stability["layer"] == "hidden"]
    assert mine["S"].notna().all() and mine["reason"].isna().all()
    for _, row in mine[mine["pair"] == "lag"].iterrows():
        want = oracle_s(hs[int(row["a"])], hs[int(row["b"])])
        assert row["S"] == pytest.approx(want, abs=1e-5)
        assert abs(row["S"] - want) <= row["S_err"]
    cond = report.ranks[report.ranks["layer"] == "hidden"]["cond"]
    np.testing.assert_allclose(cond, 7.6e4, rtol=0.01)
    plan = report.plan
    assert plan.delay_snapshot is not None, plan.rules["delay"]["why"]
    assert "not stable" not in report.text()


def test_plan_names_a_genuinely_nan_layer_and_excludes_it_from_the_stable_share(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    s = log_spectrum(16, 10.0)
    s[-1] = 0.0  # rank-deficient in every snapshot: its S is NaN throughout
    singular = designed(rng, (32, 16), s)
    good = designed(rng, (48, 12), log_spectrum(12, 10.0))
    layers = [
        LayerView.of("good", "good.weight", "linear", (48, 12)),
        LayerView.of("singular", "singular.weight", "linear", (32, 16)),
    ]
    gs = _settling(rng, good, 6)
    snaps = [[g, singular.astype(np.float32)] for g in gs]
    report = analyze(_write(tmp_path / "run.h5", layers, snaps), AnalysisConfig(lag=1), NO_CACHE)
    net = report.network
    # 'singular' holds 512 of 1088 parameters: counted as unstable, the share would be 47 %
    np.testing.assert_allclose(net["stable_share"], 1.0)
    np.testing.assert_allclose(net["known_share"], 576 / 1088)
    assert net["excluded"].str.contains("singular (rank-deficient", regex=False).all()
    plan = report.plan
    assert plan.delay_snapshot == 1, plan.rules["delay"]["why"]
    named = [n for n in plan.notes if "singular" in n]
    assert named and "excluded from the stable share" in named[0]
    assert "rank-deficient" in named[0] and "1-5" in named[0]
    assert any("singular" in n for n in report.notes)
    assert "not stable" not in report.text()
