"""Optimizer state across conversion and rank cuts: no stale tensors, policies map moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError
from basis_stability.lowrank import factor_of
from basis_stability.lowrank.layers import LowRankFactor
from basis_stability.lowrank.optim_state import swap_parameter
from basis_stability.training.oialr import OIALR, OIALRConfig

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}
FIRST = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _setup(opt: str, policy: str, beta: float = 0.9):
    model = _model()
    optimizer = OPTIMIZERS[opt](model.parameters())
    cfg = OIALRConfig(delay=3, interval=2, beta=beta, moments=policy)
    return model, optimizer, OIALR(model, optimizer, cfg)


def _train(model, optimizer, oialr, steps: int, scheduler=None) -> list[bool]:
    changed = []
    for _ in range(steps):
        x = torch.randn(5, 6)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        changed.append(oialr.step() if oialr is not None else False)
        assert torch.isfinite(loss)
    return changed


def _assert_consistent(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    held = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in held} == {id(p) for p in trainable}
    assert len(held) == len(trainable)
    for p, state in optimizer.state.items():
        assert any(p is q for q in trainable), "state of a parameter the model no longer has"
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == p.shape, key


def _steps(optimizer, p) -> float | None:
    step = optimizer.state[p].get("step")
    return None if step is None else float(step)


@pytest.mark.parametrize("policy", ["rotate", "slice", "reset", "restart"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_stale_state_after_convert_and_updates(opt, policy):
    model, optimizer, oialr = _setup(opt, policy)
    _train(model, optimizer, oialr, 2)
    _assert_consistent(model, optimizer)
    assert oialr.phase == "full"
    _train(model, optimizer, oialr, 1)  # step 3: convert
    assert oialr.phase == "low-rank"
    _assert_consistent(model, optimizer)
    for _ in range(3):
        _train(model, optimizer, oialr, 2)  # an update every 2 steps
        _assert_consistent(model, optimizer)
    assert any(k < 6 for k in oialr.ranks().values())  # beta 0.9 did cut
    # the first cut comes with the conversion, then one every 2 steps
    assert [e["event"] for e in oialr.events] == ["convert"] + ["update"] * 4


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_step_counter_is_kept(opt):
    """``slice`` (and ``reset``) keep Adam's step: its bias correction does not restart."""
    model, optimizer, oialr = _setup(opt, "slice")
    _train(model, optimizer, oialr, 3)  # converts after the third step
    for name, module in oialr.layers.items():
        assert _steps(optimizer, factor_of(module).S) == 3.0, name
    _train(model, optimizer, oialr, 2)  # one update at step 5
    for module in oialr.layers.values():
        assert _steps(optimizer, factor_of(module).S) == 5.0


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_restart_zeroes_the_step_counter_and_the_moments(opt):
    model, optimizer, oialr = _setup(opt, "restart")
    _train(model, optimizer, oialr, 3)  # converts (and cuts) after the third step
    for module in oialr.layers.values():
        state = optimizer.state[factor_of(module).S]
        assert _steps(optimizer, factor_of(module).S) == 0.0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    _train(model, optimizer, oialr, 1)
    for module in oialr.layers.values():
        assert _steps(optimizer, factor_of(module).S) == 1.0  # bias correction starts again
    _train(model, optimizer, oialr, 1)  # step 5: an update restarts it again
    for module in oialr.layers.values():
        assert _steps(optimizer, factor_of(module).S) == 0.0


def _record_rotations(monkeypatch) -> dict[int, object]:
    rotations: dict[int, object] = {}
    original = LowRankFactor.rotate_and_truncate_

    def spy(self, k_new, svd=None):
        rotations[id(self)] = rot = original(self, k_new, svd)
        return rot

    monkeypatch.setattr(LowRankFactor, "rotate_and_truncate_", spy)
    return rotations


def _moments(optimizer, oialr) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.clone() for k, v in optimizer.state[factor_of(m).S].items() if v.dim() == 2}
        for name, m in oialr.layers.items()
    }


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_update_policies_map_moments(opt, monkeypatch):
    rotations = _record_rotations(monkeypatch)
    results = {}
    for policy in ("rotate", "slice", "reset"):
        model, optimizer, oialr = _setup(opt, policy)
        _train(model, optimizer, oialr, 4)  # converted at 3, one more step fills the moments
        before = _moments(optimizer, oialr)
        assert oialr.update()
        after = _moments(optimizer, oialr)
        results[policy] = (before, after)
        for name, module in oialr.layers.items():
            f = factor_of(module)
            rot = rotations[id(f)]
            k = rot.k_new
            assert f.rank == k
            for key, old in before[name].items():
                new = after[name][key]
                assert new.shape == (k, k)
                if policy == "reset":
                    assert torch.count_nonzero(new) == 0
                elif policy == "slice":
                    torch.testing.assert_close(new, old[:k, :k])
                elif key == FIRST[opt]:  # rotate: exactly as the gradient maps
                    oracle = (rot.Up.double().T @ old.double() @ rot.Vph.double().T)[:k, :k]
                    torch.testing.assert_close(new.double(), oracle, atol=1e-6, rtol=1e-5)
        assert any(rot.k_new < rot.k_old for rot in rotations.values())
        rotations.clear()
    # the oracle is not trivially met: rotation moves the first moments away from the slice
    name = next(iter(results["rotate"][1]))
    assert not torch.allclose(
        results["rotate"][1][name][FIRST[opt]], results["slice"][1][name][FIRST[opt]]
    )


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_conversion_policies(opt):
    for policy in ("rotate", "slice", "reset"):
        model, optimizer, oialr = _setup(opt, policy)
        _train(model, optimizer, oialr, 2)
        old = {n: optimizer.state[m.weight][FIRST[opt]].clone() for n, m in oialr.candidates}
        assert oialr.convert()
        for name, module in oialr.layers.items():
            f = factor_of(module)
            new = optimizer.state[f.S][FIRST[opt]]
            if policy == "rotate":  # G_S = U^T G_W V on the tall matrix
                m_tall = old[name].T if f.transposed else old[name]
                oracle = f.U.double().T @ m_tall.double() @ f.Vh.double().T
                torch.testing.assert_close(new.double(), oracle, atol=1e-6, rtol=1e-5)
                assert torch.count_nonzero(new) > 0
            else:  # shapes differ at conversion: slice and reset both start from zero
                assert torch.count_nonzero(new) == 0


def test_step_lr_keeps_following_its_schedule():
    model, optimizer, oialr = _setup("adamw", "slice")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    changed = _train(model, optimizer, oialr, 11, scheduler)
    assert changed[2] and changed[4]  # convert at 3, update at 5, ...
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** (11 // 2))
    assert len(optimizer.param_groups) == 1
    _assert_consistent(model, optimizer)
    # the schedule acts on the new S too: its update scales with the group's lr
    f = factor_of(next(iter(oialr.layers.values())))
    assert any(f.S is p for p in optimizer.param_groups[0]["params"])


def test_swap_parameter_rejects_a_foreign_parameter():
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer"):
        swap_parameter(optimizer, model[2].weight, nn.Parameter(torch.zeros(2, 2)), lambda k, t: t)
