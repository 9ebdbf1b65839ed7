"""recommend: the delay and beta rules on hand-made tables with hand-computed answers, the plan's
fields, and plan.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from basis_stability.errors import ConfigError
from basis_stability.recommend.plan import (
    PLAN_VERSION,
    Plan,
    PlanConfig,
    beta_curve,
    choose_beta,
    choose_delay,
    make_plan,
)


def _network(shares: list[float], first: int = 1) -> pd.DataFrame:
    snaps = np.arange(first, first + len(shares))
    return pd.DataFrame(
        {
            "snapshot": snaps,
            "epoch": snaps / 2,
            "step": 25 * snaps,
            "mean_S": 0.5,
            "weighted_S": 0.5,
            "stable_share": shares,
        }
    )


# ---------------------------------------------------------------------- delay
@pytest.mark.parametrize(
    ("shares", "want"),
    [
        ([0.5, 0.95, 0.91, 0.92, 1.0], 2),  # crosses at snapshot 2 and stays
        ([0.5, 0.95, 0.8, 0.92, 1.0], 4),  # a dip after crossing moves the delay later
        ([0.9, 0.9, 0.9], 1),  # share itself counts as stable (>=)
        ([0.95, 0.95, 0.5, 0.95], 4),
    ],
)
def test_choose_delay_stays_above_rule(shares: list[float], want: int):
    delay, why = choose_delay(_network(shares), share=0.9)
    assert delay == want
    assert why == "delay rule met"


def test_choose_delay_never_stable_says_why():
    delay, why = choose_delay(_network([0.95, 0.95, 0.2]), share=0.9)
    assert delay is None
    assert "not stable yet" in why and "20%" in why and "90%" in why


def test_choose_delay_on_an_empty_network():
    delay, why = choose_delay(_network([]), share=0.9)
    assert delay is None and "two snapshots" in why


# ---------------------------------------------------------------------- beta
# a: (10, 4) with s = 4, 2, 1, 0.5 (energy 21.25); b: (5, 3) with s = 3, 1.5, 0.25 (11.3125)
SPECTRA = {"a": np.array([4.0, 2.0, 1.0, 0.5]), "b": np.array([3.0, 1.5, 0.25])}
SHAPES = {"a": (10, 4), "b": (5, 3)}
BETAS = (0.1, 0.2, 0.3, 0.6)
# beta -> (r_a, r_b): thresholds 0.4/0.3, 0.8/0.6, 1.2/0.9, 2.4/1.8 (none on a boundary)
RANKS = {0.1: (4, 2), 0.2: (3, 2), 0.3: (2, 2), 0.6: (1, 1)}
KEPT_A = {4: 1.0, 3: 21 / 21.25, 2: 20 / 21.25, 1: 16 / 21.25}
KEPT_B = {2: 11.25 / 11.3125, 1: 9 / 11.3125}


def _kept(r: int, m: int, n: int) -> int:
    """Trainable entries after OIALR: r^2, or all m n when r (m + n) >= m n (it stays dense):
    a (10, 4) pays up to rank 2, b (5, 3) only at rank 1."""
    return r * r if r * (m + n) < m * n else m * n


def test_beta_curve_by_hand():
    curve = beta_curve(SPECTRA, SHAPES, BETAS)
    assert list(curve.columns) == ["beta", "trainable_share", "min_energy", "mean_energy"]
    assert list(curve["beta"]) == list(BETAS)
    for row in curve.itertuples():
        r_a, r_b = RANKS[row.beta]
        e = (KEPT_A[r_a], KEPT_B[r_b])
        share = (_kept(r_a, 10, 4) + _kept(r_b, 5, 3)) / 55
        assert row.trainable_share == pytest.approx(share, rel=1e-12)
        assert row.min_energy == pytest.approx(min(e), rel=1e-12)
        assert row.mean_energy == pytest.approx(sum(e) / 2, rel=1e-12)


@pytest.mark.parametrize(
    ("rule", "threshold", "want", "why"),
    [
        ("energy", 0.9, 0.3, "largest beta keeping >= 90%"),  # min energy 0.941 at 0.3
        ("energy", 0.95, 0.2, "largest beta keeping >= 95%"),  # 0.988 at 0.2, 0.941 at 0.3
        ("energy", 0.999, 0.1, "no beta keeps"),  # 0.9945 at best: the smallest beta
        # (4 + 15)/55 = 0.345 at 0.3: b's rank 2 would not pay, it counts whole; 55/55 at 0.2
        ("share", 0.4, 0.3, "smallest beta with trainable share <= 40%"),
        ("share", 0.1, 0.6, "smallest beta"),  # 19/55 > 0.1 >= 2/55
        ("share", 0.01, 0.6, "no beta reaches"),  # 2/55 at best: the largest beta
    ],
)
def test_choose_beta_both_rules(rule: str, threshold: float, want: float, why: str):
    key = "min_energy" if rule == "energy" else "target_share"
    cfg = PlanConfig(beta_rule=rule, betas=BETAS, **{key: threshold})
    beta, reason = choose_beta(beta_curve(SPECTRA, SHAPES, BETAS), cfg)
    assert beta == want
    assert why in reason


# ---------------------------------------------------------------------- the plan
def _index(count: int, steps=None, epochs=None) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "snapshot": np.arange(count),
            "epoch": 0.5 * np.arange(count) if epochs is None else epochs,
            "step": 25 * np.arange(count) if steps is None else steps,
        }
    )
    return frame.set_index("snapshot", drop=False)


def _spectra(times) -> dict[int, dict[str, np.ndarray]]:
    return {t: {n: s * (1 + 0.1 * t) for n, s in SPECTRA.items()} for t in times}


def test_make_plan_fields():
    network = _network([0.2, 0.5, 0.95, 0.97, 0.99], first=2)  # lag 2: snapshots 2..6
    cfg = PlanConfig(betas=BETAS, min_energy=0.9)
    plan, curve = make_plan(network, _spectra(range(7)), SHAPES, _index(7), 2, "Toy", cfg)
    assert (plan.delay_snapshot, plan.delay_epoch, plan.delay_step) == (4, 2.0, 100)
    assert (plan.interval_snapshots, plan.interval_epochs, plan.interval_steps) == (2, 1.0, 50)
    assert plan.beta == 0.3  # scaling a spectrum changes no ratio
    assert plan.ranks == {"a": 2, "b": 2}
    assert plan.expected_trainable_share == pytest.approx((4 + 15) / (40 + 15))  # b dense
    assert plan.layers == {"a": [10, 4], "b": [5, 3]}
    assert plan.model_class == "Toy" and len(plan.notes) == 1
    assert "the factors of b would not pay" in plan.notes[0]
    assert plan.evidence["spectra_snapshot"] == 4
    assert plan.evidence["stable_share_at_delay"] == 0.95
    assert plan.evidence["kept_energy"] == pytest.approx({"a": 20 / 21.25, "b": 11.25 / 11.3125})
    assert plan.rules["delay"] == {"tau": 0.99, "share": 0.9, "lag": 2, "why": "delay rule met"}
    assert plan.rules["beta"]["rule"] == "energy"
    pd.testing.assert_frame_equal(curve, beta_curve(_spectra([4])[4], SHAPES, BETAS))


def test_make_plan_without_a_delay_uses_the_latest_spectra_and_says_so():
    network = _network([0.2, 0.3], first=1)
    plan, _ = make_plan(network, _spectra([0, 1, 2]), SHAPES, _index(3), 1, "Toy", PlanConfig())
    assert plan.delay_snapshot is plan.delay_epoch is plan.delay_step is None
    assert plan.evidence["spectra_snapshot"] == 2
    assert len(plan.notes) == 2 and "snapshot 2" in plan.notes[0]
    assert "would not pay" in plan.notes[1]  # beta 0.15 keeps rank 2 of b (5, 3)


def test_make_plan_unknown_steps_and_epochs_are_none():
    index = _index(4, steps=[-1] * 4, epochs=[np.nan] * 4)
    network = _network([1.0, 1.0, 1.0], first=1)
    plan, _ = make_plan(network, _spectra(range(4)), SHAPES, index, 1, "Toy", PlanConfig())
    assert plan.delay_snapshot == 1
    assert plan.delay_epoch is None and plan.delay_step is None
    assert plan.interval_epochs is None and plan.interval_steps is None


def test_make_plan_short_run_has_no_interval_in_epochs():
    network = _network([1.0], first=1)
    plan, _ = make_plan(network, _spectra([0, 1]), SHAPES, _index(2), 3, "Toy", PlanConfig())
    assert plan.interval_snapshots == 3
    assert plan.interval_epochs is None and plan.interval_steps is None


def test_plan_ranks_agree_with_the_curve_even_for_a_zero_layer():
    spectra = {0: {**SPECTRA, "z": np.zeros(2)}}
    shapes = {**SHAPES, "z": (4, 2)}
    cfg = PlanConfig(betas=BETAS)
    plan, curve = make_plan(_network([]), spectra, shapes, _index(1), 1, "Toy", cfg)
    assert plan.ranks["z"] == 0  # a zero matrix has no direction to keep
    at = curve[curve["beta"] == plan.beta]["trainable_share"].iloc[0]
    assert plan.expected_trainable_share == pytest.approx(at)


# ---------------------------------------------------------------------- plan.json
def _plan() -> Plan:
    network = _network([0.2, 0.95, 0.97], first=1)
    plan, _ = make_plan(network, _spectra(range(4)), SHAPES, _index(4), 1, "Toy", PlanConfig())
    return plan


def test_plan_json_round_trip(tmp_path: Path):
    plan = _plan()
    path = plan.to_json(tmp_path / "plan.json")
    assert path == tmp_path / "plan.json"
    data = json.loads(path.read_text())
    assert data["version"] == PLAN_VERSION and data["ranks"] == plan.ranks
    assert Plan.from_json(path) == plan


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2, 3]",
        '"a string"',
        '{"version": 1}',  # right version, fields missing
        None,  # wrong version
        "missing",  # no file at all
    ],
)
def test_plan_from_json_bad_files(tmp_path: Path, content: str | None):
    path = tmp_path / "plan.json"
    if content is None:
        _plan().to_json(path)
        data = json.loads(path.read_text())
        data["version"] = PLAN_VERSION + 1
        path.write_text(json.dumps(data))
    elif content != "missing":
        path.write_text(content)
    with pytest.raises(ConfigError, match="plan"):
        Plan.from_json(path)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tau": 0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"share": 0.0}, "share"),
        ({"min_energy": -0.1}, "min_energy"),
        ({"target_share": 2}, "target_share"),
        ({"beta_rule": "budget"}, "beta_rule"),
        ({"betas": ()}, "betas"),
        ({"betas": (0.1, 1.0)}, "betas"),
        ({"betas": (0.0, 0.2)}, "betas"),
    ],
)
def test_plan_config_bad_values(kwargs: dict, name: str):
    with pytest.raises(ConfigError, match=f"`{name}`"):
        PlanConfig(**kwargs)
