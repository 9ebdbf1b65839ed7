"""The OIALR controller: schedule, rank rules, shares, NaN handling, loud misuse, auto mode."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError
from basis_stability.lowrank import factor_of
from basis_stability.recommend.plan import PlanConfig, beta_curve, choose_beta
from basis_stability.training.oialr import OIALR, OIALRConfig


def _model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    # tall shapes: (8, 6), (8, 8), (8, 3); aspect ratios all <= 10
    return nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    )


def _run(model, optimizer, oialr, steps: int, lr_noise: float = 0.0) -> list[dict]:
    for _ in range(steps):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if oialr is not None:
            oialr.step()
    return oialr.events if oialr is not None else []


def _make(cfg: OIALRConfig, lr: float = 0.05, width: int = 8):
    model = _model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, optimizer, OIALR(model, optimizer, cfg)


# ---------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(("delay", "interval"), [(0, 1), (3, 2), (5, 4)])
def test_fixed_schedule_converts_at_delay_then_updates_every_interval(delay, interval):
    model, optimizer, oialr = _make(OIALRConfig(delay=delay, interval=interval, beta=0.1))
    _run(model, optimizer, oialr, 20)
    events = [(e["step"], e["event"]) for e in oialr.events]
    convert_at = max(delay, 1)  # step() counts from 1: delay 0 converts at the first call
    assert events[0] == (convert_at, "convert")
    updates = [s for s, e in events[1:]]
    assert all(e == "update" for _, e in events[1:])
    assert updates == list(range(convert_at, 21, interval))  # the first cut at conversion
    assert oialr.converted_at == convert_at


def test_ranks_never_grow_respect_the_floor_and_cut_at_most_half():
    # one interval later: the full rank k = n right after conversion is seen once
    cfg = OIALRConfig(
        delay=1, interval=1, beta=0.95, min_rank_share=0.25, first_cut="one_interval_later"
    )
    model, optimizer, oialr = _make(cfg, width=16)
    history = [oialr.ranks()] if oialr.layers else []
    for _ in range(12):
        _run(model, optimizer, oialr, 1)
        history.append(oialr.ranks())
    n = {name: factor_of(m).tall_shape[1] for name, m in oialr.layers.items()}
    tall = {name: factor_of(m).tall_shape for name, m in oialr.layers.items()}
    start = {name: min(factor_of(m).tall_shape) for name, m in oialr.layers.items()}
    assert history[0] == start  # k = n at conversion (n <= m on the tall matrix)
    for before, after in zip(history, history[1:]):
        for name, k in after.items():
            m_, n_ = tall[name]
            paying = (m_ * n_ - 1) // (m_ + n_)  # the largest k with k (m + n) < m n
            assert k <= before[name]  # never grows
            # at most half of k per update, or down to the largest rank whose factors pay
            assert k >= min(math.ceil(before[name] / 2), paying)
            assert k >= max(1, int(0.25 * n[name]))  # the floor
    final = history[-1]
    assert final == {name: max(1, int(0.25 * n[name])) for name in final}  # beta 0.95 hits it


def test_default_floor_is_one_percent_of_n_and_at_least_one():
    cfg = OIALRConfig(delay=1, interval=1, beta=0.99)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 40))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    oialr = OIALR(model, optimizer, cfg)
    for _ in range(15):
        model(torch.randn(2, 300)).sum().backward()
        optimizer.step()
        oialr.step()
    # tall (300, 200) -> floor int(0.01 * 200) = 2; tall (200, 40) -> floor max(1, 0) = 1
    assert oialr.ranks() == {"0": 2, "2": 1}


# ---------------------------------------------------------------------------- shares
def test_trainable_and_factorised_share_by_hand():
    cfg = OIALRConfig(delay=1, interval=1, beta=0.5, dense_when_larger=False)
    model, optimizer, oialr = _make(cfg)
    full = (6 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)  # 155
    assert oialr.full_rank_trainable == full
    assert oialr.trainable_share() == 1.0 and oialr.factorised_share() == 1.0
    oialr.convert()
    # k = n: 6, 8 and 3 (the last layer's tall matrix is its 8 x 3 transpose)
    assert oialr.ranks() == {"0": 6, "2": 8, "4": 3}
    assert oialr.trainable_share() == pytest.approx((36 + 8 + 64 + 8 + 9 + 3) / full)
    assert oialr.factorised_share() == pytest.approx((36 + 64 + 9) / (48 + 64 + 24))
    oialr.update()
    k = oialr.ranks()
    assert k != {"0": 6, "2": 8, "4": 3}
    kk = sum(r * r for r in k.values())
    assert oialr.trainable_share() == pytest.approx((kk + 8 + 8 + 3) / full)
    assert oialr.factorised_share() == pytest.approx(kk / (48 + 64 + 24))
    assert oialr.events[-1]["trainable_share"] == pytest.approx(oialr.trainable_share())


# ---------------------------------------------------------------------------- NaN
def test_nan_in_s_skips_that_layer_with_a_warning():
    model, optimizer, oialr = _make(OIALRConfig(delay=1, interval=1, beta=0.5))
    oialr.convert()
    bad, good = factor_of(oialr.layers["2"]), factor_of(oialr.layers["0"])
    u, vh, s = bad.U.clone(), bad.Vh.clone(), bad.S
    with torch.no_grad():
        bad.S[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf in S of 2"):
        oialr.update()
    assert torch.equal(bad.U, u) and torch.equal(bad.Vh, vh) and bad.S is s
    assert any(p is s for g in optimizer.param_groups for p in g["params"])
    assert good.rank < 6  # the healthy layers were still updated
    assert [(e["event"], e.get("layer")) for e in oialr.events[-2:]] == [
        ("skip-nan", "2"),
        ("update", None),
    ]
    assert "2" not in oialr.events[-1]["ranks"]


# ---------------------------------------------------------------------------- misuse is loud
def test_never_stepping_the_controller_warns():
    model, optimizer, oialr = _make(OIALRConfig(delay=2, interval=3, beta=0.5))
    with pytest.warns(RuntimeWarning, match="never called"):
        _run(model, optimizer, None, 7)
    assert oialr.phase == "full"


def test_stepping_the_controller_does_not_warn():
    model, optimizer, oialr = _make(OIALRConfig(delay=2, interval=3, beta=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, optimizer, oialr, 10)


def test_attach_steps_automatically():
    model, optimizer, oialr = _make(OIALRConfig(delay=3, interval=2, beta=0.5))
    assert oialr.attach() is oialr
    oialr.attach()  # idempotent: still one step per optimizer step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(model, optimizer, None, 7)
    assert oialr.steps == 7
    assert [(e["step"], e["event"]) for e in oialr.events] == [
        (3, "convert"),
        (3, "update"),  # the first cut comes with the conversion
        (5, "update"),
        (7, "update"),
    ]
    oialr.close()
    _run(model, optimizer, None, 1)
    assert oialr.steps == 7


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"delay": 1, "beta": 0.0}, "`beta`"),
        ({"delay": 1, "beta": 1.5}, "`beta`"),
        ({"delay": 1, "beta": 0.2, "interval": 0}, "`interval`"),
        ({"delay": 500, "beta": 0.2, "total_steps": 30}, "`delay`"),
        ({"delay": -1, "beta": 0.2}, "`delay`"),
        ({"delay": 1, "beta": 0.2, "moments": "bogus"}, "`moments`"),
        ({"delay": None, "beta": 0.2}, "`delay`"),
    ],
)
def test_bad_config_names_the_argument(kwargs, arg):
    with pytest.raises(ConfigError, match=arg):
        OIALRConfig(**kwargs)


def test_model_without_eligible_layers_is_a_config_error():
    model = nn.Sequential(nn.Linear(2, 64))  # aspect 32 > 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="aspect ratio"):
        OIALR(model, optimizer, OIALRConfig(delay=1, beta=0.2))


def test_optimizer_without_the_models_parameters_is_a_config_error():
    model = _model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizer") as info:
        OIALR(model, optimizer, OIALRConfig(delay=1, beta=0.2))
    assert "2.weight" in str(info.value)


# ---------------------------------------------------------------------------- auto mode
@pytest.mark.parametrize("patience", [2, 3])
def test_auto_mode_converts_once_stable_for_patience_checks(patience):
    """With lr 0 every basis is stable (S = 1): the rule fires at the patience-th check."""
    plan = PlanConfig(tau=0.99, share=0.9)
    cfg = OIALRConfig(auto=True, beta=None, check_every=2, lag=1, patience=patience, plan=plan)
    model, optimizer, oialr = _make(cfg, lr=0.0)
    weights = {n: m.weight.detach().double().numpy().copy() for n, m in oialr.candidates}
    _run(model, optimizer, oialr, 2 * (patience + 1) + 1)
    # checks at steps 2, 4, ...: the first only fills the history (lag 1)
    checks = [e for e in oialr.events if e["event"] == "check"]
    assert [e["step"] for e in checks] == [2 * (i + 2) for i in range(patience)]
    assert [e["streak"] for e in checks] == list(range(1, patience + 1))
    for e in checks:
        assert e["stable_share"] == pytest.approx(1.0)
        assert e["mean_S"] == pytest.approx(1.0, abs=1e-5)
    decision = next(e for e in oialr.events if e["event"] == "auto-decision")
    convert = next(e for e in oialr.events if e["event"] == "convert")
    assert decision["step"] == convert["step"] == 2 * (patience + 1)
    assert oialr.converted_at == 2 * (patience + 1)
    # beta: the rule applied to spectra from an independent numpy SVD of the (unchanged) weights
    spectra, shapes = {}, {}
    for name, w in weights.items():
        tall = w.T if w.shape[0] < w.shape[1] else w
        spectra[name] = np.linalg.svd(tall, compute_uv=False)
        shapes[name] = tall.shape
    want, _ = choose_beta(beta_curve(spectra, shapes, plan.betas), plan)
    assert decision["beta"] == oialr.beta == convert["beta"] == want
    assert "why" in decision


def test_auto_mode_waits_while_bases_move():
    plan = PlanConfig(tau=0.99, share=0.9)
    cfg = OIALRConfig(auto=True, beta=None, check_every=1, lag=1, patience=1, plan=plan)
    model, optimizer, oialr = _make(cfg, lr=0.0)
    for _ in range(6):  # the weights jump between checks: their bases are never stable
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        _run(model, optimizer, oialr, 1)
    checks = [e for e in oialr.events if e["event"] == "check"]
    assert len(checks) == 5
    assert all(e["streak"] == 0 and e["stable_share"] < 1.0 for e in checks)
    assert oialr.phase == "full"


def test_auto_mode_excludes_a_rank_deficient_layer_from_the_share_and_names_it():
    """A layer whose basis is not unique (S NaN) counts neither as stable nor as unstable: with
    lr 0 the other layers are stable, so the share is 1 and the rank-deficient layer is named."""
    plan = PlanConfig(tau=0.99, share=0.9)
    cfg = OIALRConfig(auto=True, beta=None, check_every=1, lag=1, patience=1, plan=plan)
    model, optimizer, oialr = _make(cfg, lr=0.0)
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0  # 8x8 of rank 7: its polar basis is not unique
    _run(model, optimizer, oialr, 2)
    check = next(e for e in oialr.events if e["event"] == "check")
    assert check["stable_share"] == pytest.approx(1.0)
    assert check["excluded_count"] == 1 and list(check["excluded"]) == ["2"]
    assert "rank" in check["excluded"]["2"]
    assert oialr.phase == "low-rank"


# ---------------------------------------------------------------------------- never converted
def _numbers(line: str) -> dict[str, float]:
    """The numbers of a never-converted line, by the words before them."""
    pattern = (
        r"in (?P<steps>\d+) steps: last stable share (?P<last>[0-9.]+) \(best (?P<best>[0-9.]+), "
        r"mean S (?P<mean>[0-9.]+), streak (?P<streak>\d+)\) after (?P<checks>\d+) checks; it "
        r"needs (?P<share>[0-9.]+) for (?P<patience>\d+) checks in a row at S >= (?P<tau>[0-9.]+) "
        r"\(lag (?P<lag>\d+) checks of (?P<every>\d+) steps\)"
    )
    match = re.search(pattern, line)
    assert match, line
    return {k: float(v) for k, v in match.groupdict().items()}


def test_auto_mode_that_never_converts_says_so_with_the_last_checks_numbers():
    plan = PlanConfig(tau=0.99, share=0.9)
    cfg = OIALRConfig(auto=True, beta=None, check_every=1, lag=1, patience=2, plan=plan)
    model, optimizer, oialr = _make(cfg, lr=0.0)
    assert "no stability check ran" in oialr.never_converted_summary()
    for step in range(1, 7):  # the head always moves; the middle layer too at the last step
        with torch.no_grad():
            model[4].weight.add_(torch.randn_like(model[4].weight))
            if step == 6:
                model[2].weight.add_(torch.randn_like(model[2].weight))
        _run(model, optimizer, oialr, 1)
    checks = [e for e in oialr.events if e["event"] == "check"]
    assert len(checks) == 5 and oialr.phase == "full"
    line = oialr.never_converted_summary()
    assert "\n" not in line and line.startswith("OIALR auto mode never converted in 6 steps")
    got = _numbers(line)
    last = checks[-1]
    assert got["last"] == pytest.approx(last["stable_share"], abs=0.005)
    assert got["mean"] == pytest.approx(last["mean_S"], abs=0.0005)
    assert got["streak"] == last["streak"] == 0 and got["checks"] == 5 and got["steps"] == 6
    best = max(e["stable_share"] for e in checks)
    assert got["best"] == pytest.approx(best, abs=0.005) and best > last["stable_share"] + 0.1
    assert (got["share"], got["tau"], got["patience"]) == (0.9, 0.99, 2)
    assert (got["lag"], got["every"]) == (1, 1)
    assert oialr.never_converted()["best_share"] == best
    assert line.endswith("or give delay and beta")
    assert oialr.never_converted_summary(fix="use --delay").endswith("; use --delay")


def test_never_converted_before_any_check_names_the_steps_a_check_needs():
    cfg = OIALRConfig(auto=True, beta=None, check_every=5, lag=2, patience=2)
    model, optimizer, oialr = _make(cfg)
    _run(model, optimizer, oialr, 14)  # the first check comes at step 15: 3 checks of 5 steps
    assert not [e for e in oialr.events if e["event"] == "check"]
    line = oialr.never_converted_summary()
    assert line.startswith("OIALR auto mode never converted in 14 steps: no stability check ran")
    assert "the first needs 15 steps" in line and "converting needs at least 20 steps" in line
    assert oialr.never_converted() == {
        "steps": 14, "checks": 0, "tau": 0.99, "needed_share": 0.9, "patience": 2, "lag": 2,
        "check_every": 5, "first_check_step": 15,
    }  # fmt: skip


@pytest.mark.parametrize("auto", [True, False])
def test_never_converted_is_none_after_conversion_and_with_a_fixed_delay(auto):
    if auto:
        cfg = OIALRConfig(auto=True, beta=None, check_every=1, lag=1, patience=1)
        model, optimizer, oialr = _make(cfg, lr=0.0)  # still weights: stable at once
        _run(model, optimizer, oialr, 3)
        assert oialr.phase == "low-rank"
    else:
        model, optimizer, oialr = _make(OIALRConfig(delay=100, interval=5, beta=0.1))
        _run(model, optimizer, oialr, 3)
        assert oialr.phase == "full"
    assert oialr.never_converted() is None and oialr.never_converted_summary() is None
