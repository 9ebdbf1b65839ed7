"""Recording under torch.distributed: two gloo ranks on CPU, one writer (global rank 0).

Both ranks run the same code on the same run path: a DDP model trained on rank-specific data,
a recorder attached with ``every(2)`` plus a snapshot after each epoch. Only rank 0 may open or
write the file; rank 1's recorder is a no-op. The file then holds exactly the snapshots one rank
takes, and its last one equals rank 0's final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers.gloo import gloo_group
from torch import nn

import basis_stability as bs

WORLD = 2
EPOCHS = 3
STEPS_PER_EPOCH = 4
BATCH = 8

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _train_and_record(rank: int, folder: str) -> None:
    """One rank: DDP training with a recorder; leaves its facts in ``folder`` for the test."""
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, folder, WORLD):
        out = Path(folder)
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        rec = bs.Recorder(ddp, out / "run.h5").attach(opt, bs.every(2))
        # the same call with a per-rank path: only rank 0's file may appear
        solo = bs.Recorder(model, out / f"solo-rank{rank}.h5")

        gen = torch.Generator().manual_seed(100 + rank)  # rank-specific data
        x = torch.randn(EPOCHS * STEPS_PER_EPOCH * BATCH, 8, generator=gen)
        y = torch.randint(0, 4, (len(x),), generator=gen)
        returned, losses = [], []
        for epoch in range(1, EPOCHS + 1):
            for s in range(STEPS_PER_EPOCH):
                i = ((epoch - 1) * STEPS_PER_EPOCH + s) * BATCH
                loss = nn.functional.cross_entropy(ddp(x[i : i + BATCH]), y[i : i + BATCH])
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(loss.item())
            returned.append(rec.snapshot(epoch=epoch, metrics={"loss": losses[-1]}))
        solo_returned = solo.snapshot(epoch=EPOCHS)
        facts = {
            "has_writer": rec._writer is not None,
            "n_snapshots": rec.n_snapshots,
            "returned": returned,
            "solo_returned": solo_returned,
            "losses": losses,
        }
        rec.close()
        solo.close()
        (out / f"rank{rank}.json").write_text(json.dumps(facts))
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        np.savez(out / f"rank{rank}.npz", **state)
        dist.barrier()


def test_only_rank0_writes_and_last_snapshot_is_rank0_weights(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_train_and_record, args=(str(tmp_path),), nprocs=WORLD, join=True)
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    weights = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]

    # one initial + one per every(2) step + one per epoch, all on rank 0
    n_expected = 1 + EPOCHS * STEPS_PER_EPOCH // 2 + EPOCHS
    assert facts[0]["has_writer"] and facts[0]["n_snapshots"] == n_expected
    assert facts[0]["returned"] == [3, 6, 9]  # indices of the per-epoch snapshots
    assert not facts[1]["has_writer"] and facts[1]["n_snapshots"] == 0
    assert facts[1]["returned"] == [None] * EPOCHS and facts[1]["solo_returned"] is None
    assert (tmp_path / "solo-rank0.h5").exists()
    assert not (tmp_path / "solo-rank1.h5").exists(), "rank 1 created a run file"
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["run.h5", "solo-rank0.h5"]
    assert not list(tmp_path.glob(".*")), "temporary files were left behind"
    for key in weights[0].files:  # DDP kept the ranks in step
        np.testing.assert_array_equal(weights[0][key], weights[1][key])

    report = bs.validate_run(tmp_path / "run.h5")
    assert report.ok, report
    with bs.open_run(tmp_path / "run.h5") as run:
        assert run.n_snapshots == n_expected
        np.testing.assert_array_equal(run.steps, [0, 2, 4, 4, 6, 8, 8, 10, 12, 12])
        np.testing.assert_array_equal(run.epochs[[0, 3, 6, 9]], [0, 1, 2, 3])
        frame = run.snapshots()
        np.testing.assert_allclose(frame["loss"].iloc[[3, 6, 9]], facts[0]["losses"])
        for name in ("0", "2"):
            last = run.layer(name).original(-1)
            np.testing.assert_array_equal(last, weights[0][f"{name}.weight"])
            np.testing.assert_array_equal(run.layer(name)[-1], run.layer(name)[-2])
        # the initial snapshot is rank 0's initial model, which DDP broadcast to rank 1
        torch.manual_seed(0)
        init = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        np.testing.assert_array_equal(run.layer("0").original(0), init[0].weight.detach().numpy())
