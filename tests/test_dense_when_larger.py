"""Never a factorised layer bigger than dense (issue 12, point 3).

A layer of tall shape (m, n) held as rank-k factors costs k (m + n) entries against m n: OIALR
keeps it dense at conversion while its rank would not pay, returns it to dense form at an update
when it would not, factorises it once it does, and counts it whole in the trainable share.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability.exporting.factorized import export_factorized
from basis_stability.lowrank.surgery import (
    densify_layer_,
    factor_of,
    factorize_layer_,
    rebuild_low_rank,
)
from basis_stability.recommend.plan import beta_curve, expected_share
from basis_stability.recommend.rules import factors_pay, largest_paying_rank, next_rank
from basis_stability.training.oialr import OIALR, OIALRConfig


# ---------------------------------------------------------------------------- the pure rules
def test_largest_paying_rank_is_the_brute_force_one():
    for m, n in itertools.product(range(1, 40), range(1, 40)):
        paying = [k for k in range(0, min(m, n) + 1) if k * (m + n) < m * n]
        assert largest_paying_rank(m, n) == max(paying)
        assert factors_pay(largest_paying_rank(m, n), m, n) or largest_paying_rank(m, n) == 0


def _oracle(k, s, beta, m, n, max_cut, rounding, share, dense):
    """The rule written out independently: beta rank, halving cap, floor, paying clamp."""
    s = np.asarray(s, dtype=float)
    keep = k if s[0] <= 0 else int(np.count_nonzero(s >= beta * s[0]))
    best = 0
    while (best + 1) * (m + n) < m * n:
        best += 1
    if dense and keep > best:
        return None
    if keep >= k:
        return k
    kept = k * (1 - max_cut)
    cap = math.floor(kept) if rounding == "floor" else math.ceil(kept)
    out = min(k, max(keep, cap, max(1, int(share * n))))
    return max(min(out, best), keep) if dense else out


def test_next_rank_matches_an_independent_rule_on_random_cases():
    rng = random.Random(0)
    for _ in range(3000):
        m, n = rng.randint(1, 80), rng.randint(1, 80)
        m, n = max(m, n), min(m, n)
        k = rng.randint(1, n)
        s = sorted((rng.random() ** 3 for _ in range(k)), reverse=True)
        args = (rng.choice([0.05, 0.15, 0.5, 0.9]), m, n)
        opts = (rng.choice([0.25, 0.5, 1.0]), rng.choice(["ceil", "floor"]), 0.01)
        for dense in (True, False):
            got = next_rank(k, s, *args, *opts, dense_when_larger=dense)
            assert got == _oracle(k, s, *args, *opts, dense), (k, s, args, opts, dense)
            if dense and got is not None:
                assert factors_pay(got, m, n) or got == k  # an unchanged rank may be kept


def test_a_square_layer_halves_to_the_largest_paying_rank_not_to_half():
    s = [1.0] * 5 + [0.01] * 59
    assert next_rank(64, s, 0.15, 64, 64) == 31  # ceil(64 / 2) = 32 would cost 4,096 = dense
    assert next_rank(64, s, 0.15, 64, 64, dense_when_larger=False) == 32
    assert next_rank(64, [1.0] * 40 + [0.01] * 24, 0.15, 64, 64) is None  # 40 > 31: dense


# ---------------------------------------------------------------------------- the controller
def _designed(ranks: dict[int, int], width: int = 16, seed: int = 0) -> nn.Sequential:
    """Linear(width, width) layers; layer i has ``ranks[i]`` equal singular values (plus tiny)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(len(ranks)):
        lin = nn.Linear(width, width)
        q1, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        s = torch.full((width,), 1e-3)
        s[: ranks[i]] = 1.0
        with torch.no_grad():
            lin.weight.copy_(q1 @ torch.diag(s) @ q2.T)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _held(optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_a_layer_whose_rank_would_not_pay_stays_dense_and_counts_whole():
    model = _designed({0: 3, 1: 12})  # 16x16 pays up to rank 7: layer 2 keeps 12 values
    x = torch.randn(5, 16)
    before = model(x).detach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    oialr = OIALR(model, optimizer, OIALRConfig(delay=1, interval=1, beta=0.5))
    oialr.convert()
    assert isinstance(model[2], nn.Linear) and oialr.dense_layers() == ["2"]
    assert oialr.ranks() == {"0": 16}  # one interval later it is cut
    assert torch.allclose(model(x), before, atol=1e-5)
    assert id(model[2].weight) in _held(optimizer) and model[2].weight.requires_grad
    convert = [e for e in oialr.events if e["event"] == "convert"][-1]
    assert convert["dense"] == ["2"] and convert["dense_count"] == 1
    oialr.update()
    assert oialr.ranks() == {"0": 7}  # halving 16 -> 8 stops at 7, the largest paying
    assert oialr.factorised_share() == pytest.approx((7 * 7 + 256) / (2 * 256))
    full = 2 * (256 + 16)
    assert oialr.trainable_share() == pytest.approx((49 + 16 + 256 + 16) / full)
    line = oialr.dense_summary()
    assert "kept 1 of 2 eligible layers dense" in line and "2 (16x16: beta rank 12 > 7" in line


def test_a_factorised_layer_whose_rank_would_not_pay_returns_to_dense_exactly():
    model = _designed({0: 3, 1: 3})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    oialr = OIALR(model, optimizer, OIALRConfig(delay=1, interval=1, beta=0.5))
    oialr.convert()
    assert oialr.ranks() == {"0": 16, "2": 16}
    bias = model[2].bias
    with torch.no_grad():  # training spread S's spectrum: 12 equal values now
        factor = factor_of(model[2])
        factor.S.copy_(torch.diag(torch.tensor([1.0] * 12 + [1e-3] * 4)))
    x = torch.randn(5, 16)
    before = model[2](x).detach()
    effective = model[2].weight.detach().clone()
    old_s = factor.S
    oialr.update()
    assert type(model[2]) is nn.Linear and oialr.dense_layers() == ["2"]
    assert torch.allclose(model[2].weight, effective, atol=1e-6)
    assert torch.allclose(model[2](x), before, atol=1e-5)
    assert model[2].bias is bias  # the same Parameter: the optimizer keeps it and its state
    held = _held(optimizer)
    assert id(model[2].weight) in held and id(old_s) not in held
    assert oialr.events[-1]["densified"] == ["2"]
    loss = model(x).pow(2).sum()  # and it trains on
    loss.backward()
    optimizer.step()
    assert optimizer.state[model[2].weight]["exp_avg"].shape == (16, 16)


def test_a_dense_layer_is_factorised_at_an_update_once_its_rank_pays():
    model = _designed({0: 3, 1: 12})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    oialr = OIALR(model, optimizer, OIALRConfig(delay=1, interval=1, beta=0.5))
    oialr.convert()
    assert oialr.dense_layers() == ["2"]
    low = _designed({0: 5}, seed=3)[0].weight.detach()  # training made it rank 5
    with torch.no_grad():
        model[2].weight.copy_(low)
    x = torch.randn(4, 16)
    before = model[2](x).detach()
    oialr.update()
    assert oialr.dense_layers() == [] and oialr.ranks()["2"] == 7  # 16 -> halving -> 7 pays
    assert torch.allclose(model[2](x), before, atol=1e-2)  # values below beta are cut (1e-3)
    assert id(factor_of(model[2]).S) in _held(optimizer)
    assert oialr.events[-1]["factorised"] == ["2"]
    assert list(oialr.ranks()) == ["0", "2"]  # registration order kept


def test_training_never_holds_a_factorised_layer_bigger_than_dense_after_its_first_cut():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 9)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    cfg = OIALRConfig(delay=5, interval=3, beta=0.3, first_cut="at_conversion")
    oialr = OIALR(model, optimizer, cfg).attach()
    x, y = torch.randn(64, 20), torch.randint(0, 9, (64,))
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for name, module in oialr.layers.items():
            factor = factor_of(module)
            assert factors_pay(factor.rank, *factor.tall_shape), (name, factor.rank)
        assert set(oialr.layers).isdisjoint(oialr.dense_layers())
    assert oialr.converted_at is not None
    exported = export_factorized(model)
    dense_params = 20 * 32 + 32 * 32 + 32 * 9  # the weights of the dense model
    assert sum(p.numel() for p in exported.parameters() if p.dim() == 2) < dense_params


def test_the_reference_preset_factorises_regardless():
    model = _designed({0: 3, 1: 12, 2: 12})  # 3 layers: keep_last keeps the last dense
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    oialr = OIALR(model, optimizer, OIALRConfig.reference(delay=1, interval=1, beta=0.5))
    assert oialr.dense_layers() == [] and oialr.ranks() == {"0": 8, "2": 12}


def test_checkpoint_state_keeps_dense_layers_and_rebuild_factorises_only_the_others():
    model = _designed({0: 3, 1: 12})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = OIALRConfig(delay=1, interval=1, beta=0.5)
    oialr = OIALR(model, optimizer, cfg)
    oialr.convert()
    oialr.update()
    state = oialr.state()
    assert state["dense"] == ["2"] and state["ranks"] == {"0": 7}
    fresh = _designed({0: 1, 1: 1}, seed=5)
    rebuild_low_rank(fresh, state["ranks"], cfg.factorize)
    assert type(fresh[2]) is nn.Linear and factor_of(fresh[0]).rank == 7
    fresh.load_state_dict(model.state_dict())
    again = OIALR(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), cfg)
    again.load_state(state)
    assert again.dense_layers() == ["2"] and again.ranks() == {"0": 7}
    assert again.factorised_share() == pytest.approx(oialr.factorised_share())


def test_one_attention_layer_goes_dense_and_back_keeping_its_outputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Sequential(mha)
    x = torch.randn(2, 5, 8)
    before = mha(x, x, x)[0].detach()
    factorize_layer_(model, "0")
    low = model[0]
    assert torch.allclose(low(x, x, x)[0], before, atol=1e-5)
    bias, out_proj = low.in_proj_bias, low.out_proj
    old_s, weight = densify_layer_(model, "0")
    dense = model[0]
    assert type(dense) is nn.MultiheadAttention and dense.in_proj_weight is weight
    assert dense.in_proj_bias is bias and dense.out_proj is out_proj and old_s is not weight
    assert torch.allclose(dense(x, x, x)[0], before, atol=1e-5)
    assert [n for n, _ in dense.named_parameters()] == [
        n for n, _ in nn.MultiheadAttention(8, 2).named_parameters()
    ]


def test_the_plan_counts_a_layer_whose_rank_would_not_pay_whole():
    shapes = {"a": (16, 16), "b": (16, 16)}
    spectra = {"a": np.array([1.0] * 3 + [1e-3] * 13), "b": np.array([1.0] * 12 + [1e-3] * 4)}
    assert expected_share({"a": 3, "b": 12}, shapes) == pytest.approx((9 + 256) / 512)
    curve = beta_curve(spectra, shapes, (0.5,))
    assert float(curve["trainable_share"].iloc[0]) == pytest.approx((9 + 256) / 512)
