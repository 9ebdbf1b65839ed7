"""Recording an FSDP2 model (``fully_shard``) on two gloo ranks on CPU: one file, exact weights.

Both ranks build the same model (same seed), shard every Linear and the root (which then shards
the Conv1d), and train on rank-specific data. Every rank calls ``snapshot`` (explicitly, and via
an attached ``every(2)`` schedule); only rank 0 writes. Each stored snapshot must equal the full
parameters at that moment bit for bit, with uneven shards (33, 7 and 5 rows over 2 ranks) and
an even one (4 rows).
The default Shard(0) path gathers each layer to rank 0 only: no rank calls ``full_tensor``.
The biases (sharded too) are gathered the same way and stored with each snapshot (format 1.3).
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.gloo import gloo_group
from torch import nn

import basis_stability as bs
from basis_stability.errors import ConfigError

WORLD = 2
EPOCHS = 3  # explicit snapshots after each of 3 steps
ATTACHED_STEPS = 4  # every(2): snapshots after steps 2 and 4
ROWS = {"0.weight": 5, "1.weight": 33, "3.weight": 7, "5.weight": 5, "7.weight": 4}  # dim 0

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _model() -> nn.Sequential:
    # (B, 3, 12) -> Conv1d -> (B, 5, 10) -> Linears over the last dim
    return nn.Sequential(
        nn.Conv1d(3, 5, 3),
        nn.Linear(10, 33),
        nn.ReLU(),
        nn.Linear(33, 7),
        nn.ReLU(),
        nn.Linear(7, 5),
        nn.ReLU(),
        nn.Linear(5, 4),  # an even split too: 2 + 2 rows
    )


def _record_sharded(rank: int, folder: str) -> None:
    """One rank: FSDP2 training with recorders; leaves its facts in ``folder`` for the test."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from basis_stability.recording import recorder as recorder_mod

    # the Linears see (B, 5, L) inputs, so FSDP2 warns that they return views (none is edited)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    with gloo_group(rank, folder, WORLD):
        out = Path(folder)
        # count what the recorder does: full_tensor calls, and what each gather returned here
        counting, full_tensor_calls, gathered = [False], [0], []
        original_full_tensor = DTensor.full_tensor
        original_gather = recorder_mod.gather_to_rank0

        def full_tensor(self, *args, **kwargs):
            full_tensor_calls[0] += counting[0]
            return original_full_tensor(self, *args, **kwargs)

        def gather(weight):
            result = original_gather(weight)
            gathered.append(None if result is None else list(result.shape))
            return result

        DTensor.full_tensor = full_tensor
        recorder_mod.gather_to_rank0 = gather  # _matrices looks it up at each call

        @contextmanager
        def recording():
            counting[0] = True
            try:
                yield
            finally:
                counting[0] = False

        torch.manual_seed(0)  # the same initial weights on both ranks
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # the root: shards the Conv1d
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())

        def full() -> dict[str, torch.Tensor]:  # collective: every rank calls it
            return {n: p.full_tensor().detach().clone() for n, p in params.items()}

        gen = torch.Generator().manual_seed(100 + rank)  # rank-specific data

        def train_step(opt) -> None:
            loss = model(torch.randn(4, 3, 12, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        # explicit snapshots; and a recorder with a per-rank path: only rank 0's file may appear
        with recording():
            rec = bs.Recorder(model, out / "explicit.h5")
            solo = bs.Recorder(model, out / f"solo-rank{rank}.h5")
        explicit, returned = [full()], []
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for epoch in range(1, EPOCHS + 1):
            train_step(opt)
            with recording():
                returned.append(rec.snapshot(epoch=epoch, metrics={"epoch": epoch}))
            explicit.append(full())
        facts = {"has_writer": rec._writer is not None, "n_explicit": rec.n_snapshots}
        facts["solo_has_writer"] = solo._writer is not None
        rec.close()
        solo.close()

        # an attached schedule fires inside opt.step() on every rank
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with recording():
            rec = bs.Recorder(model, out / "attached.h5").attach(opt, bs.every(2))
        attached = [full()]
        for step in range(1, ATTACHED_STEPS + 1):
            with recording():
                train_step(opt)
            if step % 2 == 0:
                attached.append(full())
        facts["n_attached"] = rec.n_snapshots
        rec.close()

        facts.update(
            returned=returned,
            full_tensor_calls=full_tensor_calls[0],
            gathered=gathered,
            shard_rows={n: p.to_local().shape[0] for n, p in params.items() if n in ROWS},
            direct=[
                None if w is None else list(w.shape) for w in (original_gather(params["1.weight"]),)
            ],
        )
        (out / f"rank{rank}.json").write_text(json.dumps(facts))
        if rank == 0:
            torch.save({"explicit": explicit, "attached": attached}, out / "full.pt")

        # FSDP1 (flat parameters): refused, if it can be built at all on CPU
        from torch.distributed.fsdp import FullyShardedDataParallel

        try:
            wrapped = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)))
        except Exception as exc:  # e.g. "FSDP needs a non-CPU accelerator device"
            fsdp1 = {"built": False, "why": f"{type(exc).__name__}: {exc}"}
        else:
            try:
                bs.Recorder(wrapped, out / "fsdp1.h5")
                fsdp1 = {"built": True, "raised": None}
            except ConfigError as exc:
                fsdp1 = {"built": True, "raised": str(exc)}
        (out / f"fsdp1-rank{rank}.json").write_text(json.dumps(fsdp1))
        dist.barrier()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_record_sharded, args=(str(folder),), nprocs=WORLD, join=True)
    facts = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return folder, facts


def _assert_exact(path: Path, full: list[dict[str, torch.Tensor]]) -> None:
    with bs.open_run(path) as run:
        assert run.n_snapshots == len(full)
        assert sorted(i.param_name for i in run.layers) == sorted(ROWS)
        for info in run.layers:
            for t, weights in enumerate(full):
                want = weights[info.param_name].numpy()
                got = run.layer(info.name).original(t)
                assert got.shape == want.shape and got.dtype == want.dtype
                np.testing.assert_array_equal(got, want, err_msg=f"{info.name} at {t}")
        assert run.state_keys == [k.replace("weight", "bias") for k in ROWS]
        for t, weights in enumerate(full):
            for key, got in run.state(t).items():  # the gathered biases, bit for bit
                np.testing.assert_array_equal(got, weights[key].numpy(), err_msg=f"{key} at {t}")
        # training moved every layer: equal snapshots would not tell the moments apart
        for info in run.layers:
            for t in range(1, len(full)):
                assert not np.array_equal(run.layer(info.name)[t - 1], run.layer(info.name)[t])


def test_one_file_holds_the_exact_full_weights_at_every_snapshot(sharded) -> None:
    folder, facts = sharded
    full = torch.load(folder / "full.pt")
    assert facts[0]["has_writer"] and not facts[1]["has_writer"]
    assert facts[0]["solo_has_writer"] and not facts[1]["solo_has_writer"]
    assert facts[0]["n_explicit"] == 1 + EPOCHS and facts[1]["n_explicit"] == 0
    assert facts[0]["n_attached"] == 1 + ATTACHED_STEPS // 2 and facts[1]["n_attached"] == 0
    assert facts[0]["returned"] == [1, 2, 3] and facts[1]["returned"] == [None] * EPOCHS
    # one file per recorder, all from rank 0; no per-rank files, nothing left behind
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".h5")
    assert names == ["attached.h5", "explicit.h5", "solo-rank0.h5"]
    assert not list(folder.glob(".*")), "temporary files were left behind"

    _assert_exact(folder / "explicit.h5", full["explicit"])
    _assert_exact(folder / "attached.h5", full["attached"])
    with bs.open_run(folder / "attached.h5") as run:
        np.testing.assert_array_equal(run.steps, [0, 2, 4])
    with bs.open_run(folder / "explicit.h5") as run:
        np.testing.assert_array_equal(run.epochs, [0, 1, 2, 3])
    _assert_exact(folder / "solo-rank0.h5", full["explicit"][:1])  # the initial weights only

    # the initial snapshot is the seeded model's weights, before any sharding
    torch.manual_seed(0)
    init = _model()
    for name, p in init.named_parameters():
        torch.testing.assert_close(full["explicit"][0][name], p.detach(), rtol=0, atol=0)


def test_shards_are_uneven_and_even(sharded) -> None:
    _, facts = sharded
    for name, rows in ROWS.items():
        split = [facts[r]["shard_rows"][name] for r in range(WORLD)]
        assert split == [-(-rows // 2), rows // 2], name  # torch.chunk's split: 17+16, 4+3, 3+2
        assert (split[0] == split[1]) == (rows % 2 == 0)


def test_rank0_alone_holds_a_full_layer_and_no_rank_calls_full_tensor(sharded) -> None:
    _, facts = sharded
    # a weight and a bias per layer at every snapshot
    n_gathers = 2 * len(ROWS) * ((1 + EPOCHS) + 1 + (1 + ATTACHED_STEPS // 2))
    for r in range(WORLD):
        # the Shard(0) path gathers with dist.gather: full_tensor (an all-gather) never runs
        assert facts[r]["full_tensor_calls"] == 0, f"rank {r} called full_tensor"
        assert len(facts[r]["gathered"]) == n_gathers
    assert facts[1]["gathered"] == [None] * n_gathers, "rank 1 received a full layer"
    shapes = {tuple(s) for s in facts[0]["gathered"]}
    assert shapes == {(5, 3, 3), (33, 10), (7, 33), (5, 7), (4, 5), (5,), (33,), (7,), (4,)}
    assert facts[0]["direct"] == [[33, 10]] and facts[1]["direct"] == [None]


def test_fsdp1_is_refused(sharded) -> None:
    folder, _ = sharded
    results = [json.loads((folder / f"fsdp1-rank{r}.json").read_text()) for r in range(WORLD)]
    if not results[0]["built"]:
        pytest.skip(f"FullyShardedDataParallel (FSDP1) cannot be built here: {results[0]['why']}")
    for r in results:
        assert r["raised"] and "fully_shard" in r["raised"], r
    assert not (folder / "fsdp1.h5").exists()


def test_fsdp1_module_anywhere_in_the_model_is_refused(tmp_path: Path) -> None:
    """The refusal itself, without a process group: an FSDP1 module (not initialised: FSDP1
    cannot be built without an accelerator) nested in an ordinary model."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    flat = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(flat)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(flat))
    with pytest.raises(ConfigError, match="fully_shard"):
        bs.Recorder(model, tmp_path / "run.h5")
    assert not (tmp_path / "run.h5").exists()


def _refused_everywhere(rank: int, folder: str) -> None:
    """Rank 0 cannot create the run (it exists): every rank must raise, none may hang."""
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, folder, WORLD, "rendezvous-refused"):
        torch.manual_seed(0)
        model = _model()
        fully_shard(model)
        try:
            bs.Recorder(model, Path(folder) / "exists.h5")  # mode="create"
            outcome = "no error"
        except bs.BstabError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        (Path(folder) / f"refused-rank{rank}.txt").write_text(outcome)


def test_a_failure_to_open_on_rank0_is_raised_on_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    (tmp_path / "exists.h5").write_bytes(b"not ours")
    mp.spawn(_refused_everywhere, args=(str(tmp_path),), nprocs=WORLD, join=True)
    rank0 = (tmp_path / "refused-rank0.txt").read_text()
    rank1 = (tmp_path / "refused-rank1.txt").read_text()
    assert rank0.startswith("RunExistsError") and "exists.h5" in rank0
    assert rank1.startswith("RunFileError") and "Rank 0 could not open" in rank1
    assert "RunExistsError" in rank1  # rank 1 says why
    assert (tmp_path / "exists.h5").read_bytes() == b"not ours"  # untouched
