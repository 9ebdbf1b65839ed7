"""Basis stability S and top-k overlap O_k (SPEC §2, §3) against plain-numpy/scipy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from basis_stability.analysis import stability as stability_module
from basis_stability.analysis.spectra import SVD
from basis_stability.analysis.stability import (
    Decomposed,
    basis_reason,
    decompose,
    matched_cosines,
    overlap,
    principal_angles,
    stability,
    subspace_overlap,
    topk_reason,
)

F64 = torch.float64
F32 = torch.float32
SHAPES = [(20, 8), (12, 12), (40, 3), (5, 5), (7, 1)]
SEEDS = [0, 1, 2]
ROUND = 1e-12  # slack for float64 round-off around exact values


# ---------------------------------------------------------------- oracles (numpy/scipy only)


def np_basis(w: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return u @ vt


def np_stability(wa: np.ndarray, wb: np.ndarray) -> float:
    return float(np.trace(np_basis(wa).T @ np_basis(wb)) / min(wa.shape))


def np_overlap(wa: np.ndarray, wb: np.ndarray, k: int) -> tuple[float, float]:
    ua, _, vta = np.linalg.svd(wa, full_matrices=False)
    ub, _, vtb = np.linalg.svd(wb, full_matrices=False)
    left = np.linalg.norm(ua[:, :k].T @ ub[:, :k], "fro") ** 2 / k
    right = np.linalg.norm(vta[:k] @ vtb[:k].T, "fro") ** 2 / k
    return float(left), float(right)


def orthonormal(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((m, n)))
    return q * np.sign(np.diag(r))


def rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def dec(w: np.ndarray, dtype: torch.dtype = F64) -> Decomposed:
    return decompose(torch.from_numpy(np.ascontiguousarray(w)), dtype)


def by_hand(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> Decomposed:
    """A Decomposed built from a chosen SVD W = U diag(s) V^T (not the one LAPACK returns)."""
    u_t, s_t, vh_t = (torch.from_numpy(np.ascontiguousarray(x)) for x in (u, s, v.T))
    return Decomposed(SVD(u_t, s_t, vh_t), u_t @ vh_t, None)


def pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Independent pairs and correlated ones (b = a + t * noise) at several distances."""
    out = []
    for m, n in SHAPES:
        for seed in SEEDS:
            rng = np.random.default_rng(seed)
            a = rng.standard_normal((m, n))
            out.append((f"indep{m}x{n}_s{seed}", a, rng.standard_normal((m, n))))
            for t in (1e-6, 0.1, 1.0):
                b = a + t * rng.standard_normal((m, n))
                out.append((f"near{m}x{n}_s{seed}_t{t}", a, b))
    return out


PAIRS = pairs()
PAIR_IDS = [p[0] for p in PAIRS]


# ---------------------------------------------------------------- the basis B = U V^T


@pytest.mark.parametrize(("m", "n"), [*SHAPES, (4, 9)])
@pytest.mark.parametrize("seed", SEEDS)
def test_basis_matches_numpy_and_scipy_polar(m: int, n: int, seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((m, n))
    a = dec(w)
    assert a.reason is None
    np.testing.assert_allclose(a.basis.numpy(), np_basis(w), atol=1e-12)
    polar_u, _ = scipy.linalg.polar(w)  # the unitary polar factor, an SVD-free oracle
    np.testing.assert_allclose(a.basis.numpy(), polar_u, atol=1e-10)
    # float32: within round-off of the float64 oracle on these well-conditioned matrices
    np.testing.assert_allclose(dec(w, F32).basis.double().numpy(), polar_u, atol=2e-4)


def test_basis_of_a_known_factorisation() -> None:
    """W = Q1 diag(s) Q2^T has B = Q1 Q2^T, whatever s (repeated values included)."""
    rng = np.random.default_rng(11)
    for s in ([5.0, 3.0, 1.0, 0.2], [3.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]):
        q1, q2 = orthonormal(rng, 9, 4), orthonormal(rng, 4, 4)
        w = q1 @ np.diag(s) @ q2.T
        np.testing.assert_allclose(dec(w).basis.numpy(), q1 @ q2.T, atol=1e-12)
        np.testing.assert_allclose(dec(w, F32).basis.double().numpy(), q1 @ q2.T, atol=1e-5)


def test_an_orthogonal_matrix_is_its_own_basis() -> None:
    q = orthonormal(np.random.default_rng(5), 7, 7)
    np.testing.assert_allclose(dec(q).basis.numpy(), q, atol=1e-12)


# ---------------------------------------------------------------- S and O_k vs oracles


@pytest.mark.parametrize(("name", "wa", "wb"), PAIRS, ids=PAIR_IDS)
def test_stability_matches_numpy(name: str, wa: np.ndarray, wb: np.ndarray) -> None:
    m = stability(dec(wa), dec(wb))
    assert m.reason is None
    assert m.value == pytest.approx(np_stability(wa, wb), abs=1e-12)
    assert -1 - ROUND <= m.value <= 1 + ROUND
    # float32 SVDs against the float64 oracle
    m32 = stability(dec(wa, F32), dec(wb, F32))
    assert m32.value == pytest.approx(np_stability(wa, wb), abs=1e-5)


@pytest.mark.parametrize(("name", "wa", "wb"), PAIRS, ids=PAIR_IDS)
def test_overlap_matches_numpy_for_every_k(name: str, wa: np.ndarray, wb: np.ndarray) -> None:
    a, b = dec(wa), dec(wb)
    n = wa.shape[1]
    for k in range(1, n + 1):
        o = overlap(a, b, k)
        assert o.reason is None and o.k == k
        left, right = np_overlap(wa, wb, k)
        assert o.left == pytest.approx(left, abs=1e-10)
        assert o.right == pytest.approx(right, abs=1e-10)
        assert -ROUND <= o.left <= 1 + ROUND and -ROUND <= o.right <= 1 + ROUND


@pytest.mark.parametrize(("name", "wa", "wb"), PAIRS[::4], ids=PAIR_IDS[::4])
def test_principal_angles_match_scipy(name: str, wa: np.ndarray, wb: np.ndarray) -> None:
    a, b = dec(wa), dec(wb)
    n = wa.shape[1]
    for k in {1, max(1, n // 2), n}:
        qa, qb = a.svd.U[:, :k], b.svd.U[:, :k]
        angles = principal_angles(qa, qb).numpy()
        ref = np.sort(scipy.linalg.subspace_angles(qa.numpy(), qb.numpy()))  # scipy: descending
        # arccos loses precision near 0 (d angle ~ sqrt(eps)); scipy uses sines there
        np.testing.assert_allclose(angles, ref, atol=1e-7)
        assert np.all(np.diff(angles) >= -1e-12)  # ascending, as documented
        # O_k is the mean squared cosine of the principal angles
        assert subspace_overlap(qa, qb) == pytest.approx(np.mean(np.cos(ref) ** 2), abs=1e-10)


def test_principal_angle_of_known_subspaces() -> None:
    theta = 0.3
    e = np.eye(5)
    qa = torch.from_numpy(e[:, :2].copy())
    qb = torch.from_numpy(
        np.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 4]], 1)
    )
    np.testing.assert_allclose(principal_angles(qa, qb).numpy(), [0.0, theta], atol=1e-7)
    assert subspace_overlap(qa, qb) == pytest.approx((1 + math.cos(theta) ** 2) / 2, abs=1e-14)
    np.testing.assert_allclose(matched_cosines(qa, qb).numpy(), [1.0, math.cos(theta)], atol=1e-14)


def test_matched_cosines_match_numpy() -> None:
    rng = np.random.default_rng(4)
    qa, qb = orthonormal(rng, 10, 4), orthonormal(rng, 10, 4)
    qb[:, 1] *= -1  # signed cosine would be negative: the absolute value is reported
    got = matched_cosines(torch.from_numpy(qa), torch.from_numpy(qb)).numpy()
    np.testing.assert_allclose(got, np.abs(np.einsum("ij,ij->j", qa, qb)), atol=1e-14)
    assert np.all((got >= 0) & (got <= 1 + ROUND))


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_flips_of_singular_pairs_change_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    wa, wb = rng.standard_normal((15, 6)), rng.standard_normal((15, 6))
    a, b = dec(wa), dec(wb)
    u, s, vh = (x.numpy() for x in a.svd)
    d = rng.choice([-1.0, 1.0], size=6)
    d[0] = -1.0  # at least one flip
    flipped = by_hand(u * d, s, (d[:, None] * vh).T)
    np.testing.assert_allclose(
        flipped.svd.U @ torch.diag(flipped.svd.S) @ flipped.svd.Vh, wa, atol=1e-12
    )
    np.testing.assert_allclose(flipped.basis.numpy(), a.basis.numpy(), atol=1e-12)
    assert stability(flipped, b).value == pytest.approx(stability(a, b).value, abs=1e-12)
    assert stability(flipped, a).value == pytest.approx(1.0, abs=1e-12)
    for k in range(1, 7):
        assert overlap(flipped, b, k).left == pytest.approx(overlap(a, b, k).left, abs=1e-12)
        assert overlap(flipped, b, k).right == pytest.approx(overlap(a, b, k).right, abs=1e-12)
        assert overlap(flipped, a, k).left == pytest.approx(1.0, abs=1e-12)
    # the per-vector cosines do see the flip only through the absolute value: all 1
    np.testing.assert_allclose(matched_cosines(flipped.svd.U, a.svd.U).numpy(), 1.0, atol=1e-12)


def test_decomposing_the_same_matrix_again_gives_s_one() -> None:
    w = np.random.default_rng(0).standard_normal((8, 20)).T  # a non-contiguous view
    for dtype, tol in ((F64, 1e-12), (F32, 1e-6)):
        a = decompose(torch.from_numpy(w), dtype)
        a2 = decompose(torch.from_numpy(w.copy()), dtype)
        assert stability(a, a2).value == pytest.approx(1.0, abs=tol)
        assert stability(a, a).value == pytest.approx(1.0, abs=tol)
        o = overlap(a, a2, 3)
        assert (o.left, o.right) == pytest.approx((1.0, 1.0), abs=tol)


@pytest.mark.parametrize("kind", ["rotation", "reflection"])
@pytest.mark.parametrize("seed", SEEDS)
def test_rotation_inside_a_repeated_singular_value_changes_nothing(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = np.array([3.0, 2.0, 2.0, 1.0])
    q1, q2 = orthonormal(rng, 6, 4), orthonormal(rng, 4, 4)
    w = q1 @ np.diag(s) @ q2.T
    r = rotation(rng.uniform(0.3, 2.8))
    if kind == "reflection":  # det -1: a rotation combined with a sign flip
        r = r @ np.diag([1.0, -1.0])
    u2, v2 = q1.copy(), q2.copy()
    u2[:, 1:3] = q1[:, 1:3] @ r  # the same 2x2 orthogonal map on both sides ...
    v2[:, 1:3] = q2[:, 1:3] @ r
    np.testing.assert_allclose(u2 @ np.diag(s) @ v2.T, w, atol=1e-12)  # ... leaves W unchanged
    rotated, a = by_hand(u2, s, v2), dec(w)
    np.testing.assert_allclose(rotated.basis.numpy(), q1 @ q2.T, atol=1e-12)  # and B unchanged
    np.testing.assert_allclose(a.basis.numpy(), q1 @ q2.T, atol=1e-12)

    wb = rng.standard_normal((6, 4))
    b = dec(wb)
    ref = np_stability(w, wb)
    assert stability(rotated, b).value == pytest.approx(ref, abs=1e-12)
    assert stability(a, b).value == pytest.approx(ref, abs=1e-12)
    assert stability(rotated, a).value == pytest.approx(1.0, abs=1e-12)
    # top-1 and top-3 subspaces are unique (gaps 3 > 2 and 2 > 1): unchanged too
    for k in (1, 3, 4):
        o_rot, o_lapack = overlap(rotated, b, k), overlap(a, b, k)
        assert o_rot.left == pytest.approx(o_lapack.left, abs=1e-12)
        assert o_rot.right == pytest.approx(o_lapack.right, abs=1e-12)
        assert overlap(rotated, a, k).left == pytest.approx(1.0, abs=1e-12)
    # k = 2 splits the repeated value: undefined for either SVD, in either precision
    for x in (rotated, a, dec(w, F32)):
        o = overlap(x, b if x.svd.S.dtype == F64 else dec(wb, F32), 2)
        assert math.isnan(o.left) and math.isnan(o.right)
        assert "no spectral gap" in o.reason
    # the matched per-vector cosines are *not* invariant inside the repeated value
    cos = matched_cosines(rotated.svd.U, torch.from_numpy(q1)).numpy()
    np.testing.assert_allclose(cos[[0, 3]], 1.0, atol=1e-12)
    assert np.all(cos[1:3] < 1 - 1e-3)


@pytest.mark.parametrize(("m", "n"), SHAPES)
def test_s_of_a_with_itself_is_one_and_with_minus_itself_is_minus_one(m: int, n: int) -> None:
    w = np.random.default_rng(m * n).standard_normal((m, n))
    a, neg = dec(w), dec(-w)
    assert stability(a, a).value == pytest.approx(1.0, abs=ROUND)
    # B(-W) = -B(W)
    np.testing.assert_allclose(neg.basis.numpy(), -a.basis.numpy(), atol=1e-12)
    assert stability(a, neg).value == pytest.approx(-1.0, abs=ROUND)
    # the subspaces of -W are those of W
    for k in range(1, n + 1):
        o = overlap(a, neg, k)
        assert (o.left, o.right) == pytest.approx((1.0, 1.0), abs=ROUND)


@pytest.mark.parametrize("seed", SEEDS)
def test_s_ignores_singular_values_and_common_orthogonal_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    wa, wb = rng.standard_normal((10, 5)), rng.standard_normal((10, 5))
    ref = np_stability(wa, wb)
    assert stability(dec(3.7 * wa), dec(wb)).value == pytest.approx(ref, abs=1e-12)
    # W -> Q W P with orthogonal Q (m x m), P (n x n) applied to both
    # snapshots maps B -> Q B P and leaves trace(B_a^T B_b) unchanged
    q, p = orthonormal(rng, 10, 10), orthonormal(rng, 5, 5)
    assert stability(dec(q @ wa @ p), dec(q @ wb @ p)).value == pytest.approx(ref, abs=1e-12)
    # a matrix sharing W's U and V (other positive singular values) has the same basis: S = 1
    u, s, vt = np.linalg.svd(wa, full_matrices=False)
    other = u @ np.diag(s[::-1] + 1.0) @ vt
    assert stability(dec(wa), dec(other)).value == pytest.approx(1.0, abs=1e-12)


def test_independent_random_matrices_give_s_near_zero() -> None:
    """For i.i.d. Gaussian W_a, W_b (m x n): E[S] = 0 and Var[S] = 1/(m n) exactly.

    Derivation: B(Q W P) = Q B(W) P for orthogonal Q, P, and a Gaussian matrix is invariant under
    both, so B_b is Haar-distributed on the Stiefel manifold, independent of B_a. Completing B_a
    to an orthogonal Q_a, trace(B_a^T B_b) = sum_j (Q_a^T B_b)_jj, and Q_a^T B_b has B_b's law.
    Each column of B_b is uniform on the sphere, so E[B_jj^2] = 1/m; flipping row j (an orthogonal
    map) shows E[B_jj] = 0 and E[B_jj B_kk] = 0 for j != k. Hence Var(trace) = n/m and
    Var(S) = Var(trace)/n^2 = 1/(m n). Bounds: each |S| < 6 sd (Chebyshev: probability < 1/36 even
    without normality; S is a sum of n weakly dependent terms, close to Gaussian, so ~2e-9 per
    pair); the mean of N pairs within 5 sd/sqrt(N); the sample variance within 30% of 1/(m n)
    (its relative sd is about sqrt(2/N) = 8% for N = 300). Fixed seed: deterministic.
    """
    rng = np.random.default_rng(2024)
    m, n, count = 16, 8, 300
    sd = 1 / math.sqrt(m * n)
    values = np.array(
        [
            stability(dec(rng.standard_normal((m, n))), dec(rng.standard_normal((m, n)))).value
            for _ in range(count)
        ]
    )
    assert np.all(np.abs(values) < 6 * sd)
    assert abs(values.mean()) < 5 * sd / math.sqrt(count)
    assert 0.7 < values.var() / sd**2 < 1.3
    # a bigger matrix: tighter around 0
    big = stability(dec(rng.standard_normal((64, 32))), dec(rng.standard_normal((64, 32))))
    assert abs(big.value) < 6 / math.sqrt(64 * 32)


def test_independent_random_subspaces_overlap_k_over_dim() -> None:
    """E[O_k] = k/m for independent uniformly random k-dim subspaces of R^m (E cos^2 = 1/m)."""
    rng = np.random.default_rng(99)
    m, n, k, count = 16, 8, 2, 300
    o = [
        overlap(dec(rng.standard_normal((m, n))), dec(rng.standard_normal((m, n))), k)
        for _ in range(count)
    ]
    assert np.mean([x.left for x in o]) == pytest.approx(k / m, abs=0.02)
    assert np.mean([x.right for x in o]) == pytest.approx(k / n, abs=0.03)


@pytest.mark.parametrize("seed", SEEDS)
def test_transposition_swaps_left_and_right(seed: int) -> None:
    """SPEC §1: B(W^T) = B(W)^T, so S(W_a, W_b) = S(W_a^T, W_b^T); O_k left <-> right."""
    rng = np.random.default_rng(seed)
    wa = rng.standard_normal((11, 4))
    wb = wa + 0.5 * rng.standard_normal((11, 4))
    a, b, at, bt = dec(wa), dec(wb), dec(wa.T), dec(wb.T)
    np.testing.assert_allclose(at.basis.numpy(), a.basis.numpy().T, atol=1e-12)
    assert stability(at, bt).value == pytest.approx(stability(a, b).value, abs=1e-12)
    assert stability(at, bt).value == pytest.approx(np_stability(wa, wb), abs=1e-12)
    assert stability(at, at).value == pytest.approx(1.0, abs=ROUND)
    for k in range(1, 5):
        o, ot = overlap(a, b, k), overlap(at, bt, k)
        assert ot.left == pytest.approx(o.right, abs=1e-12)
        assert ot.right == pytest.approx(o.left, abs=1e-12)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_full_k_covers_the_whole_space(n: int) -> None:
    rng = np.random.default_rng(n)
    o = overlap(dec(rng.standard_normal((n, n))), dec(rng.standard_normal((n, n))), n)
    assert (o.left, o.right) == pytest.approx((1.0, 1.0), abs=ROUND)
    # tall: V spans all of R^n at k = n, U only an n-dim subspace of R^m
    o = overlap(dec(rng.standard_normal((3 * n, n))), dec(rng.standard_normal((3 * n, n))), n)
    assert o.right == pytest.approx(1.0, abs=ROUND)
    assert o.left < 1 - 1e-3


def test_ranges_over_many_pairs() -> None:
    rng = np.random.default_rng(17)
    for _ in range(60):
        m, n = sorted(rng.integers(1, 12, size=2))[::-1]
        wa = rng.standard_normal((m, n))
        sign = rng.choice([-1.0, 1.0])
        wb = sign * wa + 10 ** rng.uniform(-8, 1) * rng.standard_normal((m, n))
        a, b = dec(wa), dec(wb)
        s = stability(a, b).value
        assert -1 - ROUND <= s <= 1 + ROUND
        k = int(rng.integers(1, n + 1))
        o = overlap(a, b, k)
        assert -ROUND <= o.left <= 1 + ROUND and -ROUND <= o.right <= 1 + ROUND


# ---------------------------------------------------------------- NaN with reasons


def rank_two(dtype_seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(dtype_seed)
    return rng.standard_normal((6, 2)) @ rng.standard_normal((2, 4))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("seed", range(5))
def test_rank_deficient_gives_nan_with_reason(dtype: torch.dtype, seed: int) -> None:
    bad, good = (
        dec(rank_two(seed), dtype),
        dec(np.random.default_rng(seed).standard_normal((6, 4)), dtype),
    )
    assert bad.basis is None
    assert "rank-deficient" in bad.reason and "numerical rank 2 < 4" in bad.reason
    for x, y in ((bad, good), (good, bad), (bad, bad)):
        m = stability(x, y)
        assert math.isnan(m.value) and "rank-deficient" in m.reason


def test_zero_matrix_gives_nan_with_reason() -> None:
    zero, good = dec(np.zeros((6, 4))), dec(np.random.default_rng(0).standard_normal((6, 4)))
    assert zero.basis is None and "zero matrix" in zero.reason
    for x, y in ((zero, good), (good, zero)):
        m = stability(x, y)
        assert math.isnan(m.value) and "zero matrix" in m.reason
        o = overlap(x, y, 2)
        assert math.isnan(o.left) and math.isnan(o.right) and "zero matrix" in o.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_non_finite_weights_give_nan_with_reason(value: float, dtype: torch.dtype) -> None:
    w = np.random.default_rng(0).standard_normal((6, 4))
    w_bad = w.copy()
    w_bad[2, 1] = value
    bad, good = dec(w_bad, dtype), dec(w, dtype)
    assert bad.basis is None and "NaN/Inf" in bad.reason
    for x, y in ((bad, good), (good, bad)):
        m = stability(x, y)
        assert math.isnan(m.value) and "NaN/Inf" in m.reason
        o = overlap(x, y, 2)
        assert math.isnan(o.left) and "NaN/Inf" in o.reason


def test_weights_overflowing_the_svd_precision_give_nan_not_an_exception() -> None:
    w = (
        np.random.default_rng(0).standard_normal((6, 4)) * 1e300
    )  # finite in float64, Inf in float32
    a = dec(w, F32)
    assert a.basis is None and "NaN/Inf" in a.reason
    assert math.isnan(stability(a, a).value)
    assert stability(dec(w), dec(w)).value == pytest.approx(1.0, abs=ROUND)


def test_first_reason_wins_when_both_are_undefined() -> None:
    zero, low = dec(np.zeros((6, 4))), dec(rank_two())
    assert "zero matrix" in stability(zero, low).reason
    assert "rank-deficient" in stability(low, zero).reason


def test_no_spectral_gap_straddling_k() -> None:
    rng = np.random.default_rng(1)
    w = orthonormal(rng, 8, 5) @ np.diag([5.0, 3.0, 3.0, 3.0, 1.0]) @ orthonormal(rng, 5, 5).T
    other = dec(rng.standard_normal((8, 5)))
    for dtype in (F32, F64):
        a = dec(w, dtype)
        b = other if dtype == F64 else dec(rng.standard_normal((8, 5)), F32)
        for k in (2, 3):  # s_k == s_k+1
            for x, y in ((a, b), (b, a)):
                o = overlap(x, y, k)
                assert math.isnan(o.left) and math.isnan(o.right) and o.k == k
                assert "no spectral gap" in o.reason
        for k in (1, 4, 5):
            assert overlap(a, b, k).reason is None
        assert stability(a, b).reason is None  # the basis is still unique


@pytest.mark.parametrize("k", [0, -1, 5, 100])
def test_k_out_of_range_gives_nan_with_reason(k: int) -> None:
    rng = np.random.default_rng(0)
    o = overlap(dec(rng.standard_normal((7, 4))), dec(rng.standard_normal((7, 4))), k)
    assert math.isnan(o.left) and math.isnan(o.right) and o.k == k
    assert f"k={k} outside 1..4" in o.reason


def test_overlap_of_rank_deficient_matrices() -> None:
    """Defined where the top-k subspace is unique (k <= rank with a gap), NaN beyond."""
    wa, wb = rank_two(0), np.random.default_rng(3).standard_normal((6, 4))
    a, b = dec(wa), dec(wb)
    for k in (1, 2):
        o = overlap(a, b, k)
        assert o.reason is None
        assert (o.left, o.right) == pytest.approx(np_overlap(wa, wb, k), abs=1e-10)
    # s_3 = s_4 = 0: no gap at k = 3; at k = n = 4 the left subspace (in R^6) is not unique either
    for k in (3, 4):
        for x, y in ((a, b), (b, a)):
            o = overlap(x, y, k)
            assert math.isnan(o.left) and math.isnan(o.right) and "no spectral gap" in o.reason
    assert overlap(b, b, 4).reason is None


def test_full_k_of_a_tall_rank_deficient_matrix_is_ambiguous() -> None:
    """Why k = n needs s_n > 0 when m > n: two valid SVDs of one W give different left O_n."""
    rng = np.random.default_rng(8)
    q = orthonormal(rng, 6, 6)
    v = orthonormal(rng, 4, 4)
    s = np.array([3.0, 1.0, 0.0, 0.0])
    w = q[:, :4] @ np.diag(s) @ v.T
    u_other = q[:, [0, 1, 4, 5]]  # the same W: the zero singular values take other columns
    np.testing.assert_allclose(u_other @ np.diag(s) @ v.T, w, atol=1e-14)
    one, two = by_hand(q[:, :4], s, v), by_hand(u_other, s, v)
    assert subspace_overlap(one.svd.U, two.svd.U) == pytest.approx(0.5)  # not 1: arbitrary
    o = overlap(one, two, 4)
    assert math.isnan(o.left) and "no spectral gap" in o.reason
    assert overlap(one, two, 2).left == pytest.approx(1.0, abs=1e-12)  # the unique top-2 part
    # a square matrix at k = n spans the whole space on both sides: defined even when singular
    sq = dec(np.diag([2.0, 1.0, 0.0]))
    assert overlap(sq, dec(np.diag([1.0, 3.0, 2.0])), 3).left == pytest.approx(1.0, abs=ROUND)


def test_shape_mismatch_raises() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one shape"):
        stability(dec(rng.standard_normal((6, 4))), dec(rng.standard_normal((6, 3))))


def test_reason_helpers_directly() -> None:
    s = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    assert basis_reason(s, (5, 3), F64) is None
    assert "NaN/Inf" in basis_reason(torch.tensor([math.nan, 1.0, 0.5]), (5, 3), F32)
    assert "zero matrix" in basis_reason(torch.zeros(3), (5, 3), F32)
    assert "zero matrix" in basis_reason(torch.zeros(0), (5, 0), F32)
    assert "rank-deficient" in basis_reason(torch.tensor([1.0, 1e-9, 0.0]), (5, 3), F32)
    assert topk_reason(s, 2, F64) is None
    assert topk_reason(s, 3, F64) is None
    assert "outside" in topk_reason(s, 4, F64)
    assert "no spectral gap" in topk_reason(torch.tensor([2.0, 1.0, 1.0], dtype=F64), 2, F64)
    assert "NaN/Inf" in topk_reason(torch.tensor([math.inf, 1.0]), 1, F32)


def test_module_doctest() -> None:
    import doctest

    assert doctest.testmod(stability_module, raise_on_error=False).failed == 0


# ----------------------------------------------------------------------------- pairwise fast path
@pytest.mark.parametrize("shape", [(12, 5), (9, 9)])
def test_pairwise_stability_and_overlap_equal_the_one_pair_definitions(shape):
    from basis_stability.analysis.stability import pairwise_overlap, pairwise_stability

    gen = torch.Generator().manual_seed(7)
    decs = [
        decompose(torch.randn(*shape, generator=gen, dtype=torch.float64), torch.float64)
        for _ in range(5)
    ]
    s_all = pairwise_stability(torch.stack([d.basis for d in decs]))
    k = 3
    o_left = pairwise_overlap(torch.stack([d.svd.U[:, :k] for d in decs]))
    o_right = pairwise_overlap(torch.stack([d.svd.Vh[:k].T for d in decs]))
    for a in range(5):
        for b in range(5):
            assert s_all[a, b].item() == pytest.approx(stability(decs[a], decs[b]).value, abs=1e-12)
            one = overlap(decs[a], decs[b], k)
            assert o_left[a, b].item() == pytest.approx(one.left, abs=1e-12)
            assert o_right[a, b].item() == pytest.approx(one.right, abs=1e-12)
