"""Singular values and ranks (SPEC §4) against plain-numpy oracles written here."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

from basis_stability.analysis import spectra
from basis_stability.analysis.spectra import (
    compact_svd,
    effective_rank,
    energy_rank,
    numerical_rank,
    stable_rank,
)
from basis_stability.recommend.rules import rank_at_beta

SHAPES = [(30, 10), (12, 12), (50, 3), (7, 7), (9, 1)]
SEEDS = [0, 1, 2]
EPS_VALUES = [0.0, 0.01, 0.1, 0.3, 0.5, 0.9]
BETAS = [0.01, 0.1, 0.15, 0.5, 0.9]


# ---------------------------------------------------------------- oracles (numpy only)


def np_svals(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)


def np_stable_rank(s: np.ndarray) -> float:
    return float(np.sum(s**2) / s[0] ** 2)


def np_effective_rank(s: np.ndarray) -> float:
    p = s / np.sum(s)
    p = p[p > 0]  # 0 log 0 = 0
    return float(np.exp(-np.sum(p * np.log(p))))


def np_energy_rank(s: np.ndarray, eps: float) -> int:
    e = s**2
    cum = np.cumsum(e)
    return next(r + 1 for r in range(len(s)) if cum[r] >= (1 - eps) * e.sum() * (1 - 1e-12))


def np_rank_at_beta(s: np.ndarray, beta: float) -> int:
    return int(np.count_nonzero(s >= beta * s[0]))


def orthonormal(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, n)))
    return q * np.sign(np.diag(r))


def with_singular_values(rng: np.random.Generator, m: int, s: np.ndarray) -> np.ndarray:
    """Q1 diag(s) Q2^T with Haar-random Q1 (m, n), Q2 (n, n)."""
    n = len(s)
    return orthonormal(rng, m, n) @ np.diag(s) @ orthonormal(rng, n, n).T


def structured() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    low = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 12))
    return {
        "diagonal": np.diag([3.0, -5.0, 0.5, 2.0, 1e-3]),
        "orthogonal": orthonormal(rng, 9, 9),
        "tall_orthonormal": orthonormal(rng, 20, 6),
        "low_rank_plus_noise": low + 1e-3 * rng.standard_normal(low.shape),
        "known_s": with_singular_values(rng, 15, np.array([10.0, 4.0, 4.0, 2.5, 1.0, 0.1])),
        "rank_one": np.outer(rng.standard_normal(8), rng.standard_normal(5)),
    }


def matrices() -> list[tuple[str, np.ndarray]]:
    out = []
    for m, n in SHAPES:
        for seed in SEEDS:
            w = np.random.default_rng(seed).standard_normal((m, n))
            out.append((f"randn{m}x{n}_s{seed}", w))
    out += list(structured().items())
    return out


MATRICES = matrices()
IDS = [name for name, _ in MATRICES]


# ---------------------------------------------------------------- compact_svd


@pytest.mark.parametrize(("name", "w"), MATRICES, ids=IDS)
def test_compact_svd_float64_matches_numpy(name: str, w: np.ndarray) -> None:
    m, n = w.shape
    u, s, vh = compact_svd(torch.from_numpy(w), torch.float64)
    assert u.shape == (m, n) and s.shape == (n,) and vh.shape == (n, n)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    ref = np_svals(w)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12, atol=1e-13 * ref[0])
    # a genuine factorisation with orthonormal factors
    np.testing.assert_allclose((u * s) @ vh, w, atol=1e-12 * ref[0])
    np.testing.assert_allclose(u.T @ u, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(vh @ vh.T, np.eye(n), atol=1e-12)
    assert torch.all(s[:-1] >= s[1:]) and torch.all(s >= 0)


@pytest.mark.parametrize(("name", "w"), MATRICES, ids=IDS)
def test_compact_svd_float32_within_1e5_of_float64_numpy(name: str, w: np.ndarray) -> None:
    u, s, vh = compact_svd(torch.from_numpy(w), torch.float32)
    assert s.dtype == u.dtype == vh.dtype == torch.float32
    ref = np_svals(w)
    # backward stability bounds the error by ~eps32 * s_1 (norm-wise), whatever the conditioning
    np.testing.assert_array_less(np.abs(s.double().numpy() - ref), 1e-5 * ref[0])


def test_compact_svd_float32_relative_per_value_on_well_conditioned() -> None:
    rng = np.random.default_rng(3)
    s_true = np.array([9.0, 7.5, 5.0, 3.0, 2.0, 1.0])
    w = with_singular_values(rng, 25, s_true)
    s32 = compact_svd(torch.from_numpy(w).float(), torch.float32).S.double().numpy()
    np.testing.assert_allclose(s32, s_true, rtol=1e-5)
    np.testing.assert_allclose(s32, np_svals(w), rtol=1e-5)
    s64 = compact_svd(torch.from_numpy(w), torch.float64).S.numpy()
    np.testing.assert_allclose(s64, s_true, rtol=1e-13)


def test_compact_svd_half_input_is_decomposed_in_the_requested_precision() -> None:
    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    svd = compact_svd(w, torch.float32)
    assert svd.S.dtype == torch.float32
    np.testing.assert_allclose(svd.S.numpy(), np_svals(w.float().numpy()), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.complex64])
def test_compact_svd_refuses_other_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        compact_svd(torch.ones(3, 2), dtype)


# ---------------------------------------------------------------- ranks vs oracles


@pytest.mark.parametrize(("name", "w"), MATRICES, ids=IDS)
def test_ranks_match_numpy_oracles(name: str, w: np.ndarray) -> None:
    s = np_svals(w)
    st = torch.from_numpy(s)
    assert stable_rank(st) == pytest.approx(np_stable_rank(s), rel=1e-12)
    assert effective_rank(st) == pytest.approx(np_effective_rank(s), rel=1e-12)
    for eps in EPS_VALUES:
        assert energy_rank(st, eps) == np_energy_rank(s, eps), eps
    for beta in BETAS:
        assert rank_at_beta(st, beta) == np_rank_at_beta(s, beta), beta
    # the same from the package's own float32 SVD (what the engine will feed)
    s32 = compact_svd(torch.from_numpy(w), torch.float32).S
    assert stable_rank(s32) == pytest.approx(np_stable_rank(s), rel=1e-5)
    assert effective_rank(s32) == pytest.approx(np_effective_rank(s), rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_on_random_spectra(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    s = np.sort(rng.exponential(size=int(rng.integers(1, 40))))[::-1].copy()
    st = torch.from_numpy(s)
    assert stable_rank(st) == pytest.approx(np_stable_rank(s), rel=1e-12)
    assert effective_rank(st) == pytest.approx(np_effective_rank(s), rel=1e-12)
    for eps in np.linspace(0, 0.95, 20):
        assert energy_rank(st, float(eps)) == np_energy_rank(s, eps)
    for beta in np.linspace(0.01, 0.99, 20):
        assert rank_at_beta(st, float(beta)) == np_rank_at_beta(s, beta)


def test_ranks_accept_lists_numpy_and_float32() -> None:
    s = [4.0, 2.0, 1.0, 0.0]
    for x in (s, np.array(s), torch.tensor(s, dtype=torch.float32)):
        assert stable_rank(x) == 1.3125
        assert rank_at_beta(x, 0.25) == 3
        assert energy_rank(x, 0.1) == 2
        assert effective_rank(x) == pytest.approx(np_effective_rank(np.array(s)), rel=1e-12)


def test_module_doctest() -> None:
    assert doctest.testmod(spectra, raise_on_error=False).failed == 0


# ---------------------------------------------------------------- known values


def test_orthogonal_matrix_has_every_rank_n() -> None:
    n = 9
    s = compact_svd(torch.from_numpy(structured()["orthogonal"]), torch.float64).S
    assert stable_rank(s) == pytest.approx(n, rel=1e-12)
    assert effective_rank(s) == pytest.approx(n, rel=1e-12)
    assert rank_at_beta(s, 0.99) == n
    assert energy_rank(s, 0.0) == n
    # equal energies: r(eps) = ceil((1 - eps) n)
    for eps in (0.05, 0.3, 0.5, 0.95):
        assert energy_rank(s, eps) == math.ceil((1 - eps) * n - 1e-9)


def test_rank_one_matrix() -> None:
    s = compact_svd(torch.from_numpy(structured()["rank_one"]), torch.float64).S
    assert stable_rank(s) == pytest.approx(1.0, rel=1e-12)
    assert effective_rank(s) == pytest.approx(1.0, rel=1e-12)
    assert energy_rank(s, 0.0) == 1
    assert rank_at_beta(s, 0.01) == 1
    assert numerical_rank(s, (8, 5), torch.float64) == 1


def test_diagonal_matrix_values_are_sorted_absolute_diagonal() -> None:
    w = structured()["diagonal"]
    s = compact_svd(torch.from_numpy(w), torch.float64).S.numpy()
    np.testing.assert_allclose(s, np.sort(np.abs(np.diag(w)))[::-1], rtol=1e-14)
    assert rank_at_beta(torch.from_numpy(s), 0.09) == 4  # 5, 3, 2, 0.5 >= 0.45
    assert rank_at_beta(torch.from_numpy(s), 0.11) == 3


def test_effective_rank_of_uniform_k_values_is_k() -> None:
    for k in (1, 2, 5):
        assert effective_rank(torch.tensor([2.0] * k + [0.0] * 3)) == pytest.approx(k, rel=1e-12)


def test_low_rank_plus_noise_ranks_find_the_rank() -> None:
    s = torch.from_numpy(np_svals(structured()["low_rank_plus_noise"]))
    assert rank_at_beta(s, 0.01) == 3
    assert energy_rank(s, 1e-4) == 3
    assert numerical_rank(s, (40, 12), torch.float64) == 12  # the noise is real


def test_rank_at_beta_is_inclusive_at_the_cut() -> None:
    assert rank_at_beta(torch.tensor([4.0, 2.0, 1.0, 0.5]), 0.25) == 3  # 1.0 >= 0.25 * 4
    assert rank_at_beta(torch.tensor([4.0, 2.0, 1.0, 0.5]), 0.125) == 4


def test_energy_rank_boundaries() -> None:
    ones = torch.ones(4, dtype=torch.float64)
    assert energy_rank(ones, 0.25) == 3  # exactly 75% at r = 3
    assert energy_rank(ones, 0.0) == 4
    # eps = 0 gives the number of nonzero values (round-off slack, no spill into zeros)
    assert energy_rank(torch.tensor([3.0, 1.0, 1e-3, 0.0, 0.0]), 0.0) == 3
    assert energy_rank(torch.tensor([5.0]), 0.5) == 1


# ---------------------------------------------------------------- numerical rank


@pytest.mark.parametrize(("m", "n", "r"), [(10, 6, 2), (8, 8, 5), (12, 4, 4), (6, 4, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_numerical_rank_matches_numpy_matrix_rank(m: int, n: int, r: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    s64 = compact_svd(torch.from_numpy(w), torch.float64).S
    assert numerical_rank(s64, (m, n), torch.float64) == np.linalg.matrix_rank(w) == r
    s32 = compact_svd(torch.from_numpy(w), torch.float32).S
    assert numerical_rank(s32, (m, n), torch.float32) == r


def test_numerical_rank_tolerance_rule() -> None:
    shape = (10, 4)
    tol = 10 * np.finfo(np.float64).eps  # max(m, n) * eps * s_1 with s_1 = 1
    s = torch.tensor([1.0, 0.5, 2 * tol, 0.5 * tol], dtype=torch.float64)
    assert numerical_rank(s, shape, torch.float64) == 3
    # the float32 tolerance is about 5e8 times larger
    assert numerical_rank(torch.tensor([1.0, 0.5, 1e-7, 0.0]), shape, torch.float32) == 2


# ---------------------------------------------------------------- zero matrix and bad arguments


@pytest.mark.parametrize("s", [torch.zeros(4), torch.zeros(1), torch.zeros(0)], ids=["4", "1", "0"])
def test_zero_matrix_gives_nan_ratios_and_zero_counts(s: torch.Tensor) -> None:
    assert math.isnan(stable_rank(s))
    assert math.isnan(effective_rank(s))
    assert energy_rank(s, 0.1) == 0
    assert energy_rank(s, 0.0) == 0
    assert rank_at_beta(s, 0.15) == 0
    assert numerical_rank(s, (6, 4), torch.float32) == 0


def test_zero_matrix_through_compact_svd() -> None:
    s = compact_svd(torch.zeros(6, 4), torch.float32).S
    assert torch.all(s == 0)
    assert math.isnan(stable_rank(s)) and math.isnan(effective_rank(s))
    assert energy_rank(s) == 0 and rank_at_beta(s, 0.5) == 0


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_beta_raises(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        rank_at_beta(torch.tensor([2.0, 1.0]), beta)
    with pytest.raises(ValueError, match="beta"):
        rank_at_beta(torch.zeros(2), beta)  # checked before the zero-matrix shortcut


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5, math.nan, -math.inf])
def test_bad_eps_raises(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        energy_rank(torch.tensor([2.0, 1.0]), eps)
    with pytest.raises(ValueError, match="eps"):
        energy_rank(torch.zeros(2), eps)


def test_batch_ranks_equal_the_one_spectrum_functions_row_by_row():
    from basis_stability.analysis.spectra import batch_ranks

    rng = np.random.default_rng(3)
    rows = [np.sort(rng.random(7))[::-1] for _ in range(6)]
    rows += [np.array([2.0, 2.0, 1.0, 0, 0, 0, 0]), np.zeros(7), np.r_[1.0, np.full(6, np.nan)]]
    out = batch_ranks(np.stack(rows), eps=0.1)
    for i, row in enumerate(rows):
        if np.isnan(row).any():
            assert np.isnan(out["stable_rank"][i]) and out["energy_rank"][i] == -1
            continue
        t = torch.from_numpy(row.copy())
        for name, fn in (("stable_rank", stable_rank), ("effective_rank", effective_rank)):
            want = fn(t)
            got = out[name][i]
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-12)
        assert out["energy_rank"][i] == energy_rank(t, 0.1)
