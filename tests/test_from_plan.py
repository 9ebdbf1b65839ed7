"""``OIALRConfig.from_plan``: delay and interval in elapsed optimizer steps (from a recorded and
analysed step-scheduled run, and from an epoch-only plan), one clean error per bad input, beta
and the expected share over the layers OIALR factorises only, the uneven-spacing warning, and
``bstab train --plan`` building its config through it."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from basis_stability import analyze
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.errors import ConfigError
from basis_stability.jobs import TrainJob, oialr_config
from basis_stability.lowrank.surgery import (
    FactorizeConfig,
    eligible_by_shape,
    eligible_layers,
    shape_reason,
)
from basis_stability.recommend.plan import Plan, PlanConfig, make_plan
from basis_stability.store import RunWriter
from basis_stability.training import TrainConfig
from basis_stability.training.oialr import OIALRConfig
from basis_stability.views import LayerView, select_layers

NO_CACHE = EngineConfig(cache=False)
LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (24, 6)),
    LayerView.of("head", "head.weight", "linear", (3, 48)),  # tall (48, 3): ratio 16 > 10
]
STEPS = [0, 40, 80, 120, 160, 200, 240]  # a snapshot every 40 steps
CONSTANT_FROM = 3  # the weights stop changing at snapshot 3
LAG = 2


def _energy_beta(spectra: dict[str, np.ndarray], betas, min_energy: float) -> float:
    """The energy rule written out: the largest beta keeping min_energy in every layer."""
    fits = []
    for beta in betas:
        kept = []
        for s in spectra.values():
            r = sum(1 for x in s if x >= beta * s[0])
            kept.append(sum(x * x for x in s[:r]) / sum(x * x for x in s))
        if min(kept) >= min_energy:
            fits.append(beta)
    return max(fits)


@pytest.fixture(scope="module")
def step_run(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A step-scheduled run whose weights are random, then constant from CONSTANT_FROM on."""
    path = tmp_path_factory.mktemp("steps") / "run.h5"
    rng = np.random.default_rng(0)
    final = [rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS]
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        for t, step in enumerate(STEPS):
            mats = (
                final
                if t >= CONSTANT_FROM
                else [rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS]
            )
            w.append(iter(mats), step=step, epoch=step / 80)
    return path, final


@pytest.fixture(scope="module")
def step_plan(step_run) -> Plan:
    return analyze(step_run[0], AnalysisConfig(lag=LAG), NO_CACHE).plan


# ---------------------------------------------------------------------- elapsed steps
def test_a_step_scheduled_plan_gives_delay_and_interval_in_elapsed_steps(step_plan):
    # the first lag pair whose older end is constant too: b - LAG >= CONSTANT_FROM
    delay_oracle = STEPS[CONSTANT_FROM + LAG]
    interval_oracle = int(np.median([STEPS[b] - STEPS[b - LAG] for b in range(LAG, len(STEPS))]))
    assert step_plan.delay_snapshot == CONSTANT_FROM + LAG
    cfg = OIALRConfig.from_plan(step_plan)  # steps known: no steps_per_epoch needed
    assert (cfg.delay, cfg.interval) == (delay_oracle, interval_oracle) == (200, 80)
    assert cfg.beta == step_plan.beta and not cfg.auto
    # not the snapshot indices, nor snapshot indices times a guessed epoch length
    assert cfg.delay != step_plan.delay_snapshot and cfg.interval != LAG
    # the steps win over epochs times steps_per_epoch (which would be 5 * 2.5 = 12 here)
    assert OIALRConfig.from_plan(step_plan, steps_per_epoch=5).delay == delay_oracle


def test_from_plan_reads_a_plan_json_and_takes_overrides(step_plan, tmp_path):
    path = step_plan.to_json(tmp_path / "plan.json")
    cfg = OIALRConfig.from_plan(path, total_steps=1000, moments="slice", interval=7)
    assert (cfg.delay, cfg.interval, cfg.beta) == (200, 7, step_plan.beta)
    assert (cfg.total_steps, cfg.moments) == (1000, "slice")
    ref = OIALRConfig.from_plan(str(path), preset="reference", total_steps=1000)
    assert ref.preset == "reference" and ref.delay_counts == "started" and ref.delay == 200


def _epoch_plan(delay_epoch=2.0, interval_epochs=1.5, delay_snapshot=4) -> Plan:
    return Plan(
        model_class="Toy",
        layers={"a": [10, 4]},
        delay_snapshot=delay_snapshot,
        delay_epoch=delay_epoch,
        delay_step=None,
        interval_snapshots=3,
        interval_epochs=interval_epochs,
        interval_steps=None,
        beta=0.2,
        ranks={"a": 3},
        expected_trainable_share=0.225,
        rules={"delay": {"lag": 3, "why": "delay rule met"}},
    )


def test_an_epoch_only_plan_is_converted_with_steps_per_epoch():
    cfg = OIALRConfig.from_plan(_epoch_plan(2.5, 1.5), steps_per_epoch=12)
    assert (cfg.delay, cfg.interval, cfg.beta) == (round(2.5 * 12), round(1.5 * 12), 0.2)


# ---------------------------------------------------------------------- bad input
def test_an_epoch_only_plan_without_steps_per_epoch_names_it():
    with pytest.raises(ConfigError) as err:
        OIALRConfig.from_plan(_epoch_plan())
    text = str(err.value)
    assert "`steps_per_epoch`" in text and "delay_epoch=2" in text and "len(train_loader)" in text


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "12"])
def test_a_bad_steps_per_epoch_names_it(value):
    with pytest.raises(ConfigError, match="`steps_per_epoch`"):
        OIALRConfig.from_plan(_epoch_plan(), steps_per_epoch=value)


def test_a_plan_that_never_stabilised_says_not_stable_yet():
    plan = _epoch_plan(None, 1.5, None)
    plan.rules["delay"]["why"] = "not stable yet: at the last snapshot 40% of parameters ..."
    with pytest.raises(ConfigError) as err:
        OIALRConfig.from_plan(plan, steps_per_epoch=10)
    text = str(err.value)
    assert "not stable yet" in text and "delay_snapshot=None" in text
    assert "delay=" in text and "auto" in text
    assert OIALRConfig.from_plan(plan, steps_per_epoch=10, delay=30).delay == 30  # the fix


def test_a_plan_without_steps_or_epochs_says_so():
    plan = _epoch_plan()
    plan.interval_epochs = None  # the run recorded neither
    with pytest.raises(ConfigError) as err:
        OIALRConfig.from_plan(plan, steps_per_epoch=10)
    assert "interval_snapshots=3" in str(err.value) and "interval=" in str(err.value)


def test_an_interval_under_one_step_is_an_error():
    with pytest.raises(ConfigError) as err:
        OIALRConfig.from_plan(_epoch_plan(2.0, 0.01), steps_per_epoch=10)
    text = str(err.value)
    assert "`interval_epochs`" in text and "0.01" in text and "`lag`" in text


def test_a_plan_for_another_model_is_refused(step_plan):
    other = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 5))
    with pytest.raises(ConfigError) as err:
        OIALRConfig.from_plan(step_plan, model=other)
    text = str(err.value)
    assert "`plan`" in text and "`model`" in text and "Sequential" in text
    assert "fc missing" in text and "Toy" in text and "Analyse a run of this model" in text


def test_a_plan_of_the_same_model_is_accepted(step_plan):
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(6, 24), nn.Linear(48, 3)

    assert OIALRConfig.from_plan(step_plan, model=Toy()).delay == 200


# ---------------------------------------------------------------------- eligible layers only
def test_the_analysed_plan_excludes_the_tall_head_and_names_it(step_plan, step_run):
    _, final = step_run
    assert list(step_plan.excluded_layers) == ["head"]
    assert "aspect ratio 48/3 = 16.0 > 10" in step_plan.excluded_layers["head"]
    assert set(step_plan.ranks) == {"fc"} and set(step_plan.layers) == {"fc", "head"}
    assert any("head" in n and "kept dense" in n for n in step_plan.notes)
    # beta and the share by an independent computation over fc alone
    s = np.linalg.svd(final[0].astype(np.float64), compute_uv=False)
    cfg = PlanConfig()
    assert step_plan.beta == _energy_beta({"fc": s}, cfg.betas, cfg.min_energy)
    r = int((s >= step_plan.beta * s[0]).sum())
    kept = r * r if r * (24 + 6) < 24 * 6 else 24 * 6  # dense when its factors would not pay
    assert step_plan.expected_trainable_share == pytest.approx(kept / (24 * 6))


# the spectra of tests/test_recommend.py (beta 0.3 by hand at 90 % energy), plus a tall head whose
# energy at beta 0.3 is 1 / (1 + 3 * 0.29^2) = 0.80 < 0.9: counted, it would pull beta to 0.2
SPECTRA = {"a": np.array([4.0, 2.0, 1.0, 0.5]), "b": np.array([3.0, 1.5, 0.25])}
HEAD = np.array([1.0, 0.29, 0.29, 0.29])
SHAPES = {"a": (10, 4), "b": (5, 3), "head": (44, 4)}  # head: 44/4 = 11 > 10
BETAS = (0.1, 0.2, 0.3, 0.6)


def _toy_plan(**kwargs) -> Plan:
    spectra = {0: {**SPECTRA, "head": HEAD}}
    network = pd.DataFrame({"snapshot": [0], "epoch": [0.0], "step": [0], "stable_share": [1.0]})
    index = pd.DataFrame({"snapshot": [0], "epoch": [0.0], "step": [0]}).set_index(
        "snapshot", drop=False
    )
    kinds = {"a": "linear", "b": "linear", "head": "linear"}
    plan, _ = make_plan(
        network, spectra, SHAPES, index, 1, "Toy", PlanConfig(betas=BETAS), kinds=kinds, **kwargs
    )
    return plan


def test_beta_and_share_are_over_the_factorised_layers_only():
    plan = _toy_plan()
    assert plan.excluded_layers == {"head": "aspect ratio 44/4 = 11.0 > 10"}
    assert plan.beta == 0.3 == _energy_beta(SPECTRA, BETAS, 0.9)
    assert plan.ranks == {"a": 2, "b": 2}
    # b (5, 3) at rank 2: 2 (5 + 3) >= 15, its factors would not pay, it stays dense (15)
    assert plan.expected_trainable_share == pytest.approx((4 + 15) / (40 + 15))
    # the same run with the head eligible: it counts, and beta moves (so the rule can fail)
    wide = _toy_plan(factorize=FactorizeConfig(aspect_limit=20))
    assert wide.excluded_layers == {}
    assert wide.beta == 0.2 == _energy_beta({**SPECTRA, "head": HEAD}, BETAS, 0.9)
    # ranks 3, 2, 4: none pays (a up to 2, b 1, head 3), so every layer counts whole
    assert wide.ranks == {"a": 3, "b": 2, "head": 4}
    assert wide.expected_trainable_share == pytest.approx((40 + 15 + 176) / (40 + 15 + 176))


def test_offline_and_live_eligibility_agree_on_a_model():
    model = nn.Sequential(
        nn.Conv2d(1, 40, 1),  # a tall (40, 1) convolution: every convolution qualifies
        nn.Flatten(),
        nn.Linear(40, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.Linear(64, 4),  # the head, 64/4 = 16 > 10
    )
    for cfg in (FactorizeConfig(), FactorizeConfig(keep_first=True), FactorizeConfig(20.0)):
        live, live_skipped = eligible_layers(model, cfg)
        views = [(v.name, v.kind, v.shape) for v in select_layers(model).views]
        offline, offline_skipped = eligible_by_shape(views, cfg)
        assert offline == [name for name, _ in live]
        assert offline_skipped == live_skipped
    assert shape_reason("5", "linear", (64, 4)) == "aspect ratio 64/4 = 16.0 > 10"
    assert shape_reason("e", "embedding", (100, 8)) is not None
    assert shape_reason("5", "linear", (64, 4), FactorizeConfig(exclude=["5"])) == (
        "excluded by name"
    )


# ---------------------------------------------------------------------- uneven spacing
def test_a_plan_on_uneven_snapshots_warns_when_used(tmp_path, caplog):
    path = tmp_path / "uneven.h5"
    rng = np.random.default_rng(1)
    steps = [10, 20, 50, 100, 200]  # the checkpoints, in steps
    with RunWriter.create(path, LAYERS, model_class="Toy") as w:
        for step in steps:
            w.append(
                iter([rng.standard_normal(v.shape).astype(np.float32) for v in LAYERS]),
                step=step,
                epoch=math.nan,
            )
    plan = analyze(path, AnalysisConfig(lag=1), NO_CACHE).plan
    assert plan.uneven_spacing is True
    assert any("unevenly spaced" in n for n in plan.notes)
    plan.delay_snapshot, plan.delay_step = 2, 50  # random weights never stabilise
    with caplog.at_level(logging.WARNING, logger="basis_stability.training.oialr"):
        OIALRConfig.from_plan(plan)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "basis_stability.training.oialr"
    ]
    assert len(warned) == 1 and "unevenly spaced" in warned[0] and "lag='5ep'" in warned[0]


def test_an_evenly_spaced_plan_does_not_warn(step_plan, caplog):
    assert step_plan.uneven_spacing is False
    with caplog.at_level(logging.WARNING):
        OIALRConfig.from_plan(step_plan)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_old_plan_json_without_the_new_fields_still_loads(step_plan, tmp_path):
    import json

    path = step_plan.to_json(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    del data["excluded_layers"], data["uneven_spacing"]
    path.write_text(json.dumps(data))
    assert OIALRConfig.from_plan(path).delay == 200


# ---------------------------------------------------------------------- bstab train --plan
def test_bstab_train_builds_its_plan_config_with_from_plan(step_plan, tmp_path):
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(6, 24), nn.Linear(48, 3)

    path = step_plan.to_json(tmp_path / "plan.json")
    torch.manual_seed(0)
    job = TrainJob(plan=str(path), train=TrainConfig(epochs=100))
    cfg = oialr_config(job, Toy(), steps_per_epoch=10)
    want = OIALRConfig.from_plan(path, 10, total_steps=1000, factorize=FactorizeConfig())
    assert cfg == want
    assert (cfg.delay, cfg.interval) == (200, 80)
    job = dataclasses.replace(job, interval="3steps")  # --interval replaces the plan's
    assert oialr_config(job, Toy(), steps_per_epoch=10).interval == 3
