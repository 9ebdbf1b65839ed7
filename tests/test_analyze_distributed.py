"""Analysis with its SVDs shared out over two gloo ranks on CPU: the single-process result, exactly.

The API path (two spawned ranks calling :func:`basis_stability.analysis.analyze`) and the real CLI
under ``torchrun`` are both held to the single-process result bit for bit. LAPACK's results
depend on its thread count in the last bits, so every process here, the references included,
decomposes with one thread.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from helpers.gloo import gloo_group
from torch import nn

import basis_stability as bs
from basis_stability import analyze
from basis_stability.analysis import EngineConfig
from basis_stability.analysis.distributed import assign
from basis_stability.analysis.engine import SVDCache, default_cache_path, pending_tasks
from basis_stability.analysis.report import available_rows

WORLD = 2
SNAPSHOTS = 8
STEPS_BETWEEN = 3
TABLES = ("summary", "stability", "spectra", "ranks", "network", "beta_curve")
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


class Tiny(nn.Module):
    """Six small layers of different shapes: conv2d, attention (in_proj + out_proj), linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)  # (6, 18)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)  # in_proj (18, 6), out (6, 6)
        self.fc1 = nn.Linear(6, 20)
        self.fc2 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 6)
        h, _ = self.attn(h, h, h)
        h = torch.relu(self.fc1(h.mean(1)))
        return self.head(torch.relu(self.fc2(h)))


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: the initial weights plus 7 snapshots, 3 SGD steps apart."""
    path = tmp_path_factory.mktemp("run") / "run.h5"
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    with bs.Recorder(model, path) as rec:
        for epoch in range(1, SNAPSHOTS):
            for _ in range(STEPS_BETWEEN):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.snapshot(epoch=epoch, metrics={"loss": loss.item()})
    with bs.open_run(path) as run:
        assert run.n_snapshots == SNAPSHOTS and len(run.layers) == 6
        assert {i.kind for i in run.layers} >= {"conv2d", "mha", "linear"}
    return path


def _one_thread_reference(path: Path):
    """The single-process report without a cache, decomposed with one thread like each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return analyze(path, engine=EngineConfig(cache=False))
    finally:
        torch.set_num_threads(threads)


def _costs(path: Path) -> list[float]:
    """The task costs exactly as ``fill_cache_sharded`` computes them on an empty cache."""
    with bs.open_run(path) as run:
        cache = SVDCache(run, EngineConfig(cache=False))
        tasks = pending_tasks(run, cache, available_rows(run)[0])
        infos = {i.name: i for i in run.layers}
        return [math.prod(infos[t[1]].shape) * len(t[2]) for t in tasks]


# ---------------------------------------------------------------------- the API, two ranks
def _analyze_rank(rank: int, folder: str, run_path: str) -> None:
    """One rank: analyse twice (cold, then warm cache); leaves its facts in ``folder``."""
    from basis_stability.analysis import engine

    with gloo_group(rank, folder, WORLD):
        out = Path(folder)
        decomposed: list[tuple[str, list[int]]] = []
        original = engine.decompose_snapshots

        def counting(snaps, indices, t_ids, cfg):
            decomposed.append((snaps.info.name, list(indices)))
            return original(snaps, indices, t_ids, cfg)

        engine.decompose_snapshots = counting  # fill_cache_sharded looks it up at each call
        cfg = EngineConfig(cache_path=str(out / "svd-cache.h5"))  # the same path on every rank
        cold = analyze(run_path, engine=cfg)
        n_cold = len(decomposed)
        dist.barrier()  # rank 0 has closed the cache: what is on disk now is all there is
        files_after_cold = sorted(p.name for p in out.iterdir())
        warm = analyze(run_path, engine=cfg)
        facts = {
            "cold_is_none": cold is None,
            "warm_is_none": warm is None,
            "decomposed_cold": decomposed[:n_cold],
            "decomposed_warm": decomposed[n_cold:],
            "files_after_cold": files_after_cold,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(facts))
        if rank == 0:
            with open(out / "reports.pkl", "wb") as f:
                pickle.dump({"cold": cold, "warm": warm}, f)
        dist.barrier()


@pytest.fixture(scope="module")
def distributed_api(run_file: Path, tmp_path_factory: pytest.TempPathFactory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("api")
    mp.spawn(_analyze_rank, args=(str(folder), str(run_file)), nprocs=WORLD, join=True)
    facts = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    with open(folder / "reports.pkl", "rb") as f:
        reports = pickle.load(f)
    return folder, facts, reports


def _assert_same_report(got, want, tmp_path: Path) -> None:
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name), check_exact=True)
    assert got.n_snapshots == want.n_snapshots and got.notes == want.notes
    assert want.plan is not None
    got.plan.to_json(tmp_path / "got.json")
    want.plan.to_json(tmp_path / "want.json")
    assert (tmp_path / "got.json").read_text() == (tmp_path / "want.json").read_text()


def test_two_ranks_give_exactly_the_single_process_report(
    run_file: Path, distributed_api, tmp_path: Path
) -> None:
    folder, facts, reports = distributed_api
    assert not facts[0]["cold_is_none"] and facts[1]["cold_is_none"] and facts[1]["warm_is_none"]
    _assert_same_report(reports["cold"], _one_thread_reference(run_file), tmp_path)
    assert reports["cold"].computed == SNAPSHOTS * 6

    # both ranks did work, and between them every (layer, snapshot) exactly once
    cold = [facts[r]["decomposed_cold"] for r in range(WORLD)]
    assert all(cold), f"a rank decomposed nothing: {cold}"
    done = sorted((name, t) for rank in cold for name, ts in rank for t in ts)
    with bs.open_run(run_file) as run:
        expected = sorted((i.name, t) for i in run.layers for t in range(SNAPSHOTS))
    assert done == expected
    owner = assign(_costs(run_file), WORLD)
    assert [len(c) for c in cold] == [owner.count(r) for r in range(WORLD)]

    # only rank 0 keeps a cache, at the chosen path; nothing beside the run
    assert facts[0]["files_after_cold"] == facts[1]["files_after_cold"]
    assert [n for n in facts[0]["files_after_cold"] if n.endswith(".h5")] == ["svd-cache.h5"]
    assert not default_cache_path(run_file, EngineConfig()).exists()
    assert sorted(p.name for p in run_file.parent.iterdir()) == ["run.h5"]


def test_warm_cache_computes_nothing_and_gives_the_same_report(distributed_api, tmp_path) -> None:
    _, facts, reports = distributed_api
    assert reports["warm"].computed == 0
    assert facts[0]["decomposed_warm"] == [] and facts[1]["decomposed_warm"] == []
    _assert_same_report(reports["warm"], reports["cold"], tmp_path)


# ---------------------------------------------------------------------- a live run
def _live_rank(rank: int, folder: str) -> None:
    """Rank 0 records a run while rank 1 has it open; rank 0 opens it after one more commit."""
    from basis_stability.analysis.distributed import fill_cache_sharded

    with gloo_group(rank, folder, WORLD):
        out, path = Path(folder), Path(folder) / "live.h5"
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4))
        rec = bs.Recorder(model, path)  # writes on rank 0 only; the initial snapshot
        rec.snapshot(epoch=1)
        dist.barrier()
        run = bs.open_run(path) if rank == 1 else None  # rank 1 sees 2 snapshots
        dist.barrier()
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        rec.snapshot(epoch=2)  # still open: the run is live
        dist.barrier()
        if rank == 0:
            run = bs.open_run(path)  # rank 0 sees 3
        cfg = EngineConfig(cache=False)
        cache = SVDCache(run, cfg)
        seen = run.n_snapshots
        computed = fill_cache_sharded(run, cache, cfg, available_rows(run)[0])
        facts = {"seen": seen, "computed": computed}
        if rank == 0:
            facts["cached"] = {n: sorted(ts) for n, ts in cache.memory.items()}
        run.close()
        rec.close()
        (out / f"live{rank}.json").write_text(json.dumps(facts))
        dist.barrier()


def test_a_rank_that_opened_a_live_run_earlier_still_decomposes_its_share(tmp_path: Path) -> None:
    """Rank 0 lists the tasks from what it sees; a rank that opened the run before the last
    commit must pick that commit up, not fail on an index it does not know yet."""
    import torch.multiprocessing as mp

    mp.spawn(_live_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    facts = [json.loads((tmp_path / f"live{r}.json").read_text()) for r in range(WORLD)]
    assert [f["seen"] for f in facts] == [3, 2]
    assert facts[0]["computed"] == facts[1]["computed"] == 6
    assert facts[0]["cached"] == {"0": [0, 1, 2], "1": [0, 1, 2]}


# ---------------------------------------------------------------------- assign
def test_assign_is_deterministic_complete_and_balanced() -> None:
    rng = random.Random(0)
    for trial in range(200):
        costs = [float(rng.randint(1, 1000)) for _ in range(rng.randint(0, 40))]
        world = rng.randint(1, 6)
        owner = assign(costs, world)
        assert owner == assign(list(costs), world)  # the same on every rank
        assert len(owner) == len(costs) and all(0 <= r < world for r in owner)
        load = [sum(c for c, r in zip(costs, owner) if r == w) for w in range(world)]
        if costs:
            assert max(load) <= min(load) + max(costs), (trial, costs, world, owner)
            assert math.isclose(sum(load), sum(costs))
    assert assign([5.0, 3.0, 9.0], 1) == [0, 0, 0]
    assert assign([], 3) == []
    # largest first, each to the least-loaded rank, ties to the lowest rank
    assert assign([1.0, 4.0, 3.0, 2.0], 2) == [0, 0, 1, 1]
    assert assign([2.0, 2.0, 2.0, 2.0], 2) == [0, 1, 0, 1]


def test_the_test_run_splits_over_both_ranks(run_file: Path) -> None:
    owner = assign(_costs(run_file), WORLD)
    assert owner.count(0) > 0 and owner.count(1) > 0


# ---------------------------------------------------------------------- the CLI under torchrun
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # --standalone: the launcher picks a free port itself (no race with a port chosen here)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "basis_stability", "analyze", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_cli_under_torchrun_writes_what_one_process_writes(run_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.h5"  # a copy: the torchrun analysis caches beside it
    shutil.copy(run_file, run)
    one = subprocess.run(
        [PYTHON, "-m", "basis_stability", "analyze", str(run), "-o", str(tmp_path / "out1")]
        + ["--no-plots", "--no-cache", "--no-progress"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    two = _torchrun(str(run), "-o", str(tmp_path / "out2"), "--no-plots")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "Traceback" not in two.stderr

    names = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out2").iterdir())
    assert {f"{t}.csv" for t in TABLES} | {"plan.json"} <= set(names)
    for name in names:
        if name.endswith((".csv", ".json")):  # Parquet: compared as tables below
            a, b = (tmp_path / d / name for d in ("out1", "out2"))
            assert a.read_bytes() == b.read_bytes(), name
        elif name.endswith(".parquet"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(tmp_path / "out1" / name),
                pd.read_parquet(tmp_path / "out2" / name),
                check_exact=True,
            )
    # rank 0 alone prints the report and writes the cache
    assert two.stdout.count("wrote ") == 1 and one.stdout.count("wrote ") == 1
    assert f"files to {tmp_path / 'out2'}" in two.stdout
    assert two.stdout.count("\n") == one.stdout.count("\n")
    caches = sorted(p.name for p in tmp_path.glob("*.h5"))
    assert caches == [default_cache_path(run, EngineConfig()).name, "run.h5"]


def test_follow_under_torchrun_is_refused_in_one_line(run_file: Path, tmp_path: Path) -> None:
    result = _torchrun(str(run_file), "-o", str(tmp_path / "out"), "--follow", timeout=90)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and all("--follow" in line for line in errors), result.stderr
    # the ranks print no traceback (torchrun's own launcher prints one for any failed rank)
    frames = [line for line in result.stderr.splitlines() if line.lstrip().startswith('File "')]
    assert not [f for f in frames if "basis_stability" in f or "click" in f], result.stderr
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()
