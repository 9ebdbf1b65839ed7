"""The analysis engine: decompositions equal numpy's, the sidecar cache is reused only when it is
provably this run's with these settings, and every way of computing gives the same numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis import engine as engine_mod
from basis_stability.analysis.engine import default_cache_path
from basis_stability.errors import ConfigError
from basis_stability.store import RunWriter, open_run
from basis_stability.store.h5io import write_digest
from basis_stability.views import LayerView

# "fc" is a Linear (40, 24); "conv" a Conv2d (6, 2, 2, 2) seen as its (8, 6) transpose
LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (40, 24)),
    LayerView.of("conv", "conv.weight", "conv2d", (6, 2, 2, 2)),
]
CFG = AnalysisConfig(lag=2, k=3)
FRAMES = ("stability", "spectra", "ranks", "network", "summary", "beta_curve")


def _snapshots(count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``count`` snapshots, one float32 array per layer in its tall shape."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS] for _ in range(count)]


def _write(path: Path, snaps: list[list[np.ndarray]], start: int = 0) -> None:
    writer = (
        RunWriter.create(path, LAYERS, model_class="Toy")
        if start == 0
        else RunWriter.resume(path, LAYERS)
    )
    with writer as w:
        for t, mats in enumerate(snaps, start):
            w.append(iter(mats), step=10 * t, epoch=t / 2)


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    _write(path, _snapshots(4))
    return path


def _assert_same_report(got, want) -> None:
    for name in FRAMES:
        pd.testing.assert_frame_equal(
            getattr(got, name), getattr(want, name), check_exact=True, obj=name
        )
    assert got.plan == want.plan


def _cache(run_path: Path, **kw) -> Path:
    return default_cache_path(run_path, EngineConfig(**kw))


# ---------------------------------------------------------------------- decompositions
def test_cached_decompositions_equal_numpy_svd(run_path: Path):
    analyze(run_path, CFG, EngineConfig(kmax=5))
    snaps = _snapshots(4)
    with open_run(run_path) as run:
        t_ids = run.index()["unix_time"]
    with h5py.File(_cache(run_path), "r") as f:
        for i, view in enumerate(LAYERS):
            grp = f[f"layers/{view.name}"]
            m, n = view.shape
            # no polar basis (m, n) in the cache: s, V (n, n) and the route per snapshot
            assert "B" not in grp and "U" not in grp and grp["V"].shape == (4, n, n)
            assert grp["V"].dtype == np.float32 and grp["s"].dtype == np.float64
            np.testing.assert_array_equal(grp["t_id"][:], t_ids)
            np.testing.assert_array_equal(grp["route"][:], 0)  # all by the Gram route
            for t in range(4):
                w = snaps[t][i].astype(np.float64)
                u, s, vt = np.linalg.svd(w, full_matrices=False)
                np.testing.assert_allclose(grp["s"][t], s, rtol=1e-12)
                np.testing.assert_allclose(grp["fro2"][t], (w**2).sum(), rtol=1e-12)
                v = grp["V"][t].astype(np.float64)
                # the basis rebuilt from the weights and the cached V is numpy's U V^T
                np.testing.assert_allclose(w @ (v / grp["s"][t]) @ v.T, u @ vt, atol=1e-6)
                # singular vectors up to sign: matched |cos| = 1
                np.testing.assert_allclose(np.abs((v * vt.T).sum(0)), 1, atol=1e-6)


def test_float64_mode_uses_its_own_cache_file_and_agrees(run_path: Path):
    r32 = analyze(run_path, CFG)
    r64 = analyze(run_path, CFG, EngineConfig(svd_dtype="float64"))
    assert r64.computed == 8  # the float32 cache is not reused for float64
    assert _cache(run_path).exists() and _cache(run_path, svd_dtype="float64").exists()
    with h5py.File(_cache(run_path, svd_dtype="float64"), "r") as f:
        assert f["layers/fc/V"].dtype == np.float64 and "V64" not in f["layers/fc"]
    np.testing.assert_allclose(r64.stability["S"], r32.stability["S"], atol=1e-5)
    assert analyze(run_path, CFG).computed == 0  # switching modes threw nothing away


def test_top_k_vectors_are_copies_not_views_of_the_full_svd(run_path: Path):
    with open_run(run_path) as run:
        t_id = float(run.index()["unix_time"][0])
    cfg = EngineConfig(kmax=3, svd="approx")
    _, (entry,) = engine_mod.decompose_task(str(run_path), "fc", [0], [t_id], cfg)
    assert entry.U.shape == (40, 3) and entry.V.shape == (24, 3)
    # a view would keep the whole (40, 24) U and (24, 24) Vh alive in no-cache mode
    for arr in (entry.U, entry.V):
        assert arr.flags.c_contiguous and arr.base is None


# ---------------------------------------------------------------------- reuse
def test_second_analysis_computes_nothing_and_gives_identical_frames(run_path: Path):
    first = analyze(run_path, CFG)
    assert first.computed == 8  # 4 snapshots x 2 layers
    second = analyze(run_path, CFG)
    assert second.computed == 0
    _assert_same_report(second, first)
    _assert_same_report(first, analyze(run_path, CFG, EngineConfig(cache=False)))


def test_no_cache_writes_no_file(run_path: Path):
    report = analyze(run_path, CFG, EngineConfig(cache=False))
    assert report.computed == 8
    assert sorted(p.name for p in run_path.parent.iterdir()) == ["run.h5"]


def test_appended_snapshots_are_the_only_new_svds(run_path: Path):
    assert analyze(run_path, CFG).computed == 8
    _write(run_path, _snapshots(6)[4:], start=4)
    report = analyze(run_path, CFG)
    assert report.computed == 4  # 2 new snapshots x 2 layers
    assert report.n_snapshots == 6
    _assert_same_report(report, analyze(run_path, CFG, EngineConfig(cache=False)))


def test_explicit_cache_path(run_path: Path, tmp_path: Path):
    where = tmp_path / "elsewhere" / "svd.h5"
    where.parent.mkdir()
    analyze(run_path, CFG, EngineConfig(cache_path=str(where)))
    assert where.exists() and not _cache(run_path).exists()
    assert analyze(run_path, CFG, EngineConfig(cache_path=str(where))).computed == 0


# ---------------------------------------------------------------------- untrusted caches
def test_cache_of_another_run_is_rebuilt_even_when_created_in_the_same_second(tmp_path: Path):
    run_a, run_b = tmp_path / "a.h5", tmp_path / "b.h5"
    _write(run_a, _snapshots(4, seed=1))
    _write(run_b, _snapshots(4, seed=2))
    with h5py.File(run_a, "r") as fa, h5py.File(run_b, "r+") as fb:
        fb.attrs["created"] = fa.attrs["created"]  # same model, layers and creation second
        write_digest(fb)  # a deliberate edit: re-sealed, so only the cache's check can tell them
    analyze(run_a, CFG)
    shutil.copy(_cache(run_a), _cache(run_b))
    got = analyze(run_b, CFG)
    assert got.computed == 8
    assert any("rebuilt" in n and "another run" in n for n in got.notes), got.notes
    _assert_same_report(got, analyze(run_b, CFG, EngineConfig(cache=False)))


@pytest.mark.parametrize("change", ["kmax", "cache_version", "format"])
def test_cache_with_other_settings_or_tampered_header_is_rebuilt(run_path: Path, change: str):
    analyze(run_path, CFG, EngineConfig(kmax=5))
    engine = EngineConfig(kmax=5)
    if change == "kmax":
        engine = EngineConfig(kmax=4)
    else:
        with h5py.File(_cache(run_path), "r+") as f:
            if change == "cache_version":
                settings = json.loads(f.attrs["settings"])
                settings["cache_version"] = 0
                f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            else:
                f.attrs["format"] = "something.else"
            f["layers/fc/s"][1] = 0.0  # poison: reused, this would change the results
            f["layers/fc/V"][1] = 0.0
            f["layers/fc/pair_S"][:] = 0.0
    got = analyze(run_path, CFG, engine)
    assert got.computed == 8
    assert any(n.startswith("rebuilt the SVD cache") for n in got.notes), got.notes
    with h5py.File(_cache(run_path), "r") as f:
        assert f["layers/fc/pair_L"].shape[1] == engine.kmax
    _assert_same_report(got, analyze(run_path, CFG, EngineConfig(kmax=engine.kmax, cache=False)))


@pytest.mark.parametrize("stamp", ["other", "nan"])
def test_snapshot_with_another_identity_is_recomputed_alone(run_path: Path, stamp: str):
    clean = analyze(run_path, CFG)
    with h5py.File(_cache(run_path), "r+") as f:
        grp = f["layers/fc"]
        grp["t_id"][2] = np.nan if stamp == "nan" else grp["t_id"][2] + 1.0
        grp["s"][2] = 1.0  # stale numbers that must not survive
        grp["V"][2] = 0.0
    got = analyze(run_path, CFG)
    assert got.computed == 1
    assert not got.notes
    _assert_same_report(got, clean)


def test_cache_path_that_is_not_a_cache_is_never_deleted(run_path: Path, tmp_path: Path):
    before = run_path.read_bytes()
    with pytest.raises(ConfigError, match="cache_path"):
        analyze(run_path, CFG, EngineConfig(cache_path=str(run_path)))
    assert run_path.read_bytes() == before
    text = tmp_path / "notes.txt"
    text.write_text("mine\n")
    with pytest.raises(ConfigError, match="cache_path"):
        analyze(run_path, CFG, EngineConfig(cache_path=str(text)))
    assert text.read_text() == "mine\n"


# ---------------------------------------------------------------------- processes
def test_two_jobs_give_exactly_the_frames_of_one(tmp_path: Path):
    path = tmp_path / "run.h5"
    _write(path, _snapshots(3))
    one = analyze(path, CFG, EngineConfig(cache=False, jobs=1))
    two = analyze(path, CFG, EngineConfig(jobs=2))
    assert two.computed == one.computed == 6
    _assert_same_report(two, one)
    assert analyze(path, CFG).computed == 0  # the workers' results were cached


# ---------------------------------------------------------------------- approximate mode
def _gapped(rng: np.random.Generator, m: int, n: int, top: list[float]) -> np.ndarray:
    """A matrix whose top singular values are ``top`` and the rest below 0.5: a clear gap."""
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.concatenate([top, np.linspace(0.5, 0.05, n - len(top))])
    return (u * s) @ v.T


def test_approximate_mode_matches_exact_overlaps_and_top_values(tmp_path: Path):
    views = [LayerView.of("big", "big.weight", "linear", (64, 32))]
    rng = np.random.default_rng(3)
    base = _gapped(rng, 64, 32, [10.0, 8.0, 6.0, 4.0])
    path = tmp_path / "gap.h5"
    with RunWriter.create(path, views, model_class="Toy") as w:
        for t in range(4):  # a slow drift: overlaps below 1 but the gap stays clear
            drift = 0.15 * t * rng.standard_normal(base.shape)
            w.append(iter([(base + drift).astype(np.float32)]), step=t, epoch=t)
    cfg = AnalysisConfig(lag=1, k=4)
    exact = analyze(path, cfg, EngineConfig(kmax=8))
    approx = analyze(path, cfg, EngineConfig(svd="approx", kmax=8))
    e, a = exact.stability, approx.stability
    assert e["O_left"].notna().all() and e["O_left"].min() < 0.999
    np.testing.assert_allclose(a["O_left"], e["O_left"], atol=1e-3)
    np.testing.assert_allclose(a["O_right"], e["O_right"], atol=1e-3)
    assert a["S"].isna().all()
    assert a["reason"].str.contains("approximate").all()
    top_e = exact.spectra[exact.spectra["i"] <= 4]["sigma"].to_numpy()
    top_a = approx.spectra[approx.spectra["i"] <= 4]["sigma"].to_numpy()
    np.testing.assert_allclose(top_a, top_e, rtol=1e-3)
    assert approx.spectra["i"].max() == 8  # only the top kmax values are known
    np.testing.assert_allclose(approx.ranks["stable_rank"], exact.ranks["stable_rank"], rtol=1e-3)
    assert approx.ranks["effective_rank"].isna().all()
    assert approx.plan is None and any("no plan" in n for n in approx.notes)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"svd": "fast"}, "svd"),
        ({"svd_dtype": "float16"}, "svd_dtype"),
        ({"kmax": 0}, "kmax"),
        ({"kmax": 2.5}, "kmax"),
        ({"kmax": True}, "kmax"),
        ({"jobs": 0}, "jobs"),
        ({"oversample": -1}, "oversample"),
        ({"power_iters": -1}, "power_iters"),
        ({"power_iters": 1.5}, "power_iters"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_engine_config_bad_values(kwargs: dict, name: str):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        EngineConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error(device: str):
    with pytest.raises(ConfigError, match='`device="cpu"`'):
        EngineConfig(device=device)


def test_settings_ignore_device_and_jobs_but_not_the_sketch():
    assert EngineConfig(jobs=2).settings() == EngineConfig().settings()
    assert EngineConfig().settings()["cache_version"] == engine_mod.CACHE_VERSION
    assert (
        EngineConfig(svd="approx").settings() != EngineConfig(svd="approx", oversample=5).settings()
    )
    assert (
        EngineConfig(svd="approx").settings()
        != EngineConfig(svd="approx", power_iters=4).settings()
    )


def test_cache_in_use_by_another_process_is_left_alone(tmp_path):
    """Two analyses at once: the second must not delete the first one's cache."""
    import subprocess
    import sys

    from basis_stability import analyze
    from basis_stability.analysis import EngineConfig
    from basis_stability.analysis.engine import default_cache_path

    run = tmp_path / "run.h5"
    _lock_demo_run(run)
    analyze(run)  # creates the cache
    cache = default_cache_path(run, EngineConfig())
    before = cache.stat().st_ino
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys\nf = h5py.File({str(cache)!r}, 'r+')\nprint('held', flush=True)\n"
            "sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        report = analyze(run)
        assert any("in use by another process" in n for n in report.notes)
        assert cache.exists() and cache.stat().st_ino == before
    finally:
        holder.communicate("\n", timeout=30)


def _lock_demo_run(path):
    import numpy as np

    from basis_stability.store.writer import RunWriter
    from basis_stability.views import LayerView

    rng = np.random.default_rng(0)
    views = [LayerView.of("a", "a.weight", "linear", (6, 4))]
    with RunWriter.create(path, views, model_class="M") as w:
        for t in range(3):
            w.append(iter([rng.standard_normal((6, 4)).astype(np.float32)]), step=t, epoch=t)
