"""The SVD cache never hands back numbers it cannot vouch for: a full disk, flipped bytes, an
unreadable file or an older cache version all end in the numbers of a clean analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers.cli import bstab
from helpers.mounts import fill, tmpfs

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis import engine as engine_mod
from basis_stability.analysis.engine import default_cache_path
from basis_stability.store import RunWriter
from basis_stability.views import LayerView

# the cache of "fc" (s, V (48, 48) per snapshot, and the measured pairs) is most of the run's size:
# it outgrows a nearly full disk
LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (64, 48)),
    LayerView.of("head", "head.weight", "linear", (16, 8)),
]
CFG = AnalysisConfig(lag=2, k=3)
FRAMES = ("stability", "spectra", "ranks", "network", "summary", "beta_curve")


def _write(path: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS]
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        for t in range(count):  # a slowly drifting basis: S well above 0, not 1
            mats = [b + 0.05 * t * rng.standard_normal(b.shape).astype(np.float32) for b in base]
            w.append(iter(mats), step=t, epoch=t)
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("run") / "run.h5")


@pytest.fixture(scope="module")
def clean(recorded: Path):
    return analyze(recorded, CFG, EngineConfig(cache=False))


@pytest.fixture
def run_path(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(recorded, tmp_path / "run.h5"))


def _assert_same_tables(got, want) -> None:
    for name in FRAMES:
        pd.testing.assert_frame_equal(
            getattr(got, name), getattr(want, name), check_exact=True, obj=name
        )
    assert got.plan == want.plan


def _flip(path: Path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _chunk_offset(cache: Path, dataset: str, index: int = 0) -> tuple[int, int]:
    with h5py.File(cache, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
        return info.byte_offset, info.size


# ---------------------------------------------------------------------- a full disk
def test_full_disk_during_cache_write_then_freed_gives_the_clean_tables(
    recorded: Path, clean, tmp_path: Path
):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        run = Path(shutil.copy(recorded, disk / "run.h5"))
        filler = fill(disk, 96 * 1024)  # the run fits; its cache fails part-way through
        result = bstab(
            "analyze", run, "-o", tmp_path / "out", "--lag", 2, "--k", 3, "--no-progress"
        )
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        text = " ".join(result.output.split())
        assert "could not write the SVD cache" in text and "No space left on device" in text
        got = pd.read_csv(tmp_path / "out" / "summary.csv")
        np.testing.assert_array_equal(got["final_S"], clean.summary["final_S"])
        # the same full disk for the outputs too: one clear line naming it, no traceback
        result = bstab("analyze", run, "-o", disk / "out", "--no-progress")
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert "No space left on device" in " ".join(result.output.split()), result.output
        filler.unlink()
        again = analyze(run, CFG)
        assert again.computed == 2 * 12  # nothing half-written was kept
        _assert_same_tables(again, clean)
        warm = analyze(run, CFG)
        assert warm.computed == 0 and not any("cache" in n for n in warm.notes)
        _assert_same_tables(warm, clean)


def test_a_failed_cache_write_drops_the_cache_and_keeps_going(
    run_path: Path, clean, monkeypatch: pytest.MonkeyPatch
):
    calls = {"n": 0}
    real = h5py.File.flush

    def flush(self):
        calls["n"] += 1
        if calls["n"] == 3:  # after the first layer's entries: the file holds some already
            raise RuntimeError("Unable to flush (error message = 'No space left on device')")
        return real(self)

    monkeypatch.setattr(h5py.File, "flush", flush)
    report = analyze(run_path, CFG)
    monkeypatch.undo()
    _assert_same_tables(report, clean)
    note = next(n for n in report.notes if "could not write the SVD cache" in n)
    assert "No space left on device" in note
    assert not default_cache_path(run_path, EngineConfig()).exists()


def test_entry_commit_marker_is_written_after_its_data_is_flushed(
    run_path: Path, monkeypatch: pytest.MonkeyPatch
):
    events: list[str] = []
    real_set, real_flush = h5py.Dataset.__setitem__, h5py.File.flush

    def setitem(self, key, value):
        events.append(self.name.rsplit("/", 1)[-1])
        return real_set(self, key, value)

    def flush(self):
        events.append("flush")
        return real_flush(self)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    monkeypatch.setattr(h5py.File, "flush", flush)
    analyze(run_path, CFG)
    monkeypatch.undo()
    marks = [i for i, e in enumerate(events) if e == "t_id"]
    assert marks
    for i in marks:  # every marker: data written and flushed before it, a flush after it
        before = events[:i]
        assert before[-1] in ("flush", "t_id")
        last_data = max(j for j, e in enumerate(before) if e in ("s", "fro2", "route", "V"))
        assert "flush" in before[last_data:]
        assert "flush" in events[i:]
    pair_marks = [i for i, e in enumerate(events) if e == "pair_id"]
    assert pair_marks
    for i in pair_marks:  # the measured pairs too: their values flushed before their markers
        before = events[:i]
        last_data = max(j for j, e in enumerate(before) if e in ("pair_S", "pair_L", "pair_R"))
        assert "flush" in before[last_data:] and "flush" in events[i:]


# ---------------------------------------------------------------------- damaged caches
@pytest.mark.parametrize(
    "dataset",
    [
        "layers/fc/pair_S",
        "layers/fc/pair_L",
        "layers/head/pair_R",
        "layers/head/s",
        "layers/fc/route",
    ],
)
def test_flipped_bytes_in_cached_data_are_caught_and_the_cache_rebuilt(
    run_path: Path, clean, dataset: str
):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    offset, size = _chunk_offset(cache, dataset, 3 if dataset.endswith("/s") else 0)
    # inside the written rows (Fletcher-32 cannot tell the fill's 0x0000 words from 0xFFFF)
    _flip(cache, offset + (size // 2 if dataset.endswith("/s") else 10), 2)
    report = analyze(run_path, CFG)
    _assert_same_tables(report, clean)
    assert report.computed == 2 * 12
    why = "unknown route" if dataset.endswith("route") else "checksum"
    assert any("rebuilt the SVD cache" in n and why in n for n in report.notes), report.notes
    assert analyze(run_path, CFG).computed == 0  # the rebuilt cache is good


def test_flipped_bytes_in_cached_vectors_are_caught_when_a_new_pair_needs_them(run_path: Path):
    """A warm analysis whose pairs are all cached reads no V; one that needs new pairs (another
    lag) rebuilds bases from V, and a damaged V is caught there, never used."""
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    offset, size = _chunk_offset(cache, "layers/fc/V", 3)
    _flip(cache, offset + size // 2)
    other = AnalysisConfig(lag=3, k=3)
    report = analyze(run_path, other)
    _assert_same_tables(report, analyze(run_path, other, EngineConfig(cache=False)))
    assert report.computed == 2 * 12
    assert any("rebuilt the SVD cache" in n and "checksum" in n for n in report.notes), report.notes


def test_flipped_bytes_in_pair_commit_markers_rebuild_the_cache(run_path: Path, clean):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    offset, _ = _chunk_offset(cache, "layers/head/pair_id")
    _flip(cache, offset + 8)
    report = analyze(run_path, CFG)
    _assert_same_tables(report, clean)
    assert any("rebuilt the SVD cache" in n and "checksum" in n for n in report.notes), report.notes


def test_flipped_bytes_in_commit_markers_rebuild_the_cache(run_path: Path, clean):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    offset, _ = _chunk_offset(cache, "layers/fc/t_id")
    _flip(cache, offset + 8)
    report = analyze(run_path, CFG)
    _assert_same_tables(report, clean)
    assert any("rebuilt the SVD cache" in n and "checksum" in n for n in report.notes), report.notes


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cache_hdf5_cannot_read_is_rebuilt(run_path: Path, clean, damage: str):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 3] if damage == "truncated" else data[:8] + b"x" * 4096)
    report = analyze(run_path, CFG)
    _assert_same_tables(report, clean)
    assert any("rebuilt the SVD cache" in n for n in report.notes), report.notes


def test_older_cache_version_without_checksums_is_rebuilt(run_path: Path, clean):
    cfg = EngineConfig()
    cache = default_cache_path(run_path, cfg)
    analyze(run_path, CFG, cfg)
    with h5py.File(cache, "r+") as f:  # what version 1 wrote: no checksums, version 1
        f.attrs["settings"] = f.attrs["settings"].replace(
            f'"cache_version": {engine_mod.CACHE_VERSION}', '"cache_version": 1'
        )
    report = analyze(run_path, CFG, cfg)
    _assert_same_tables(report, clean)
    assert any("cache version 1" in n for n in report.notes), report.notes
    assert engine_mod.CACHE_VERSION >= 2
    with h5py.File(cache, "r") as f:
        datasets = [f["layers"][name][key] for name in f["layers"] for key in f["layers"][name]]
        assert datasets and all(d.fletcher32 and d.chunks for d in datasets)


def test_dataset_without_checksum_is_rebuilt(run_path: Path, clean):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    with h5py.File(cache, "r+") as f:
        data = f["layers/head/V"][:]
        del f["layers/head/V"]
        f.create_dataset("layers/head/V", data=data, maxshape=(None, *data.shape[1:]))
    report = analyze(run_path, CFG)
    _assert_same_tables(report, clean)
    assert any("no checksum" in n for n in report.notes), report.notes


def test_cache_rebuild_note_reaches_bstab_analyze_output(run_path: Path, tmp_path: Path):
    analyze(run_path, CFG)
    cache = default_cache_path(run_path, EngineConfig())
    offset, size = _chunk_offset(cache, "layers/fc/pair_S", 0)
    _flip(cache, offset + 10)
    result = bstab("analyze", run_path, "-o", tmp_path / "out", "--no-plots", "--no-progress")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert any("rebuilt the SVD cache" in n and "checksum" in n for n in notes), result.output
