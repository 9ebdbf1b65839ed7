"""OIALR under torch.distributed: two gloo ranks on CPU train one DDP model (SPEC §5.5).

Each rank builds the same small model (same seed), wraps it in DistributedDataParallel and trains
it on rank-specific data with AdamW and an OIALR controller (convert after 4 steps, then an update
every 3 steps with beta = 0.3). Whenever ``OIALR.step()`` returns True the DDP wrapper is rebuilt
around the (now low-rank) model, the documented usage.

Right before the conversion, rank 1's eligible weights are perturbed on purpose (outside DDP), so
the two ranks would factorise different matrices: identical U, S, Vh afterwards can only come from
the controller's broadcast of rank 0's factors, not from DDP keeping the ranks in step. The factors
are gathered after every conversion/update *before* DDP is rebuilt (a rebuilt wrapper broadcasts
parameters and buffers itself, which would hide a missing broadcast) and again at the end.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.gloo import gloo_group
from torch import nn

from basis_stability.lowrank.surgery import factor_of
from basis_stability.training.oialr import OIALR, OIALRConfig

WORLD = 2
STEPS = 15
BATCH = 16
DELAY, INTERVAL, BETA = 4, 3, 0.3

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def _factors(oialr: OIALR) -> dict[str, dict]:
    """Every low-rank layer's U, S, Vh (copies) and rank."""
    out = {}
    for name, module in oialr.layers.items():
        f = factor_of(module)
        out[name] = {
            "U": f.U.detach().clone(),
            "S": f.S.detach().clone(),
            "Vh": f.Vh.detach().clone(),
            "rank": f.rank,
        }
    return out


def _train(rank: int, folder: str) -> None:
    """One rank: DDP + OIALR training; leaves what every rank saw in ``folder``."""
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, folder, WORLD):
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = OIALRConfig(delay=DELAY, interval=INTERVAL, beta=BETA, dense_when_larger=False)
        oialr = OIALR(ddp, opt, cfg)

        gen = torch.Generator().manual_seed(100 + rank)  # rank-specific data
        x = torch.randn(STEPS * BATCH, 1, 6, 6, generator=gen)
        y = torch.randint(0, 4, (len(x),), generator=gen)
        gathered, losses, changed_at = [], [], []
        for step in range(1, STEPS + 1):
            i = (step - 1) * BATCH
            loss = nn.functional.cross_entropy(ddp(x[i : i + BATCH]), y[i : i + BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == DELAY and rank == 1:  # the ranks now factorise different matrices
                with torch.no_grad():
                    for _, module in oialr.candidates:
                        module.weight.add_(0.01 * torch.randn_like(module.weight))
            if oialr.step():
                changed_at.append(step)
                facts = [None] * WORLD
                dist.all_gather_object(facts, _factors(oialr))  # before DDP re-broadcasts
                gathered.append(facts)
                del ddp
                ddp = DistributedDataParallel(model)
        facts = [None] * WORLD
        dist.all_gather_object(facts, _factors(oialr))
        gathered.append(facts)
        if rank == 0:
            result = {
                "gathered": gathered,
                "losses": losses,
                "changed_at": changed_at,
                "steps": oialr.steps,
                "events": [e["event"] for e in oialr.events],
                "n_layers": len(oialr.layers),
                "trainable_share": oialr.trainable_share(),
            }
            (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))
        dist.barrier()


def test_oialr_factors_identical_across_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_train, args=(str(tmp_path),), nprocs=WORLD, join=True)
    result = pickle.loads((tmp_path / "result.pkl").read_bytes())

    # one conversion, then an update every INTERVAL steps
    expected = list(range(DELAY, STEPS + 1, INTERVAL))
    assert result["changed_at"] == expected
    assert result["events"] == ["convert"] + ["update"] * len(expected)  # a cut at conversion
    assert result["steps"] == STEPS
    assert len(result["losses"]) == STEPS
    assert all(math.isfinite(v) for v in result["losses"]), result["losses"]
    assert result["n_layers"] == 4  # the conv and all three Linear layers

    previous: dict[str, int] | None = None
    for moment, facts in enumerate(result["gathered"]):
        ref = facts[0]
        assert ref and set(ref) == set(facts[1])
        for name, f0 in ref.items():
            f1 = facts[1][name]
            assert f0["rank"] == f1["rank"], (moment, name)
            for key in ("U", "S", "Vh"):
                assert f0[key].shape == f1[key].shape, (moment, name, key)
                assert torch.equal(f0[key], f1[key]), f"{key} of {name} differs at moment {moment}"
            assert torch.isfinite(f0["S"]).all()
            k = f0["rank"]
            assert f0["S"].shape == (k, k) and f0["U"].shape[1] == k and f0["Vh"].shape[0] == k
        ranks = {n: f["rank"] for n, f in ref.items()}
        if previous is not None:
            assert all(ranks[n] <= previous[n] for n in ranks), (previous, ranks)
        previous = ranks
    # beta = 0.3 on random weights does cut, so training went on with smaller layers
    first = {n: f["rank"] for n, f in result["gathered"][0][0].items()}
    assert sum(previous.values()) < sum(first.values())
    assert result["trainable_share"] < 1.0
