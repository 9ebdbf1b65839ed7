"""The offline plan and auto mode decide by the same rules (recommend/rules.py), so on one
recording they agree: the stable share auto mode measures at each epoch equals the analysis'
network table at that snapshot, the delay rule over those shares gives the plan's delay, and the
plan's ranks are the beta rule on the run's own singular values (numpy's SVD as the oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import basis_stability as bs
from basis_stability.recommend.rules import delay_start, rank_at_beta, stable_share

LAG = 2
EPOCHS = 12
PLAN = bs.PlanConfig(tau=0.97, share=0.5)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """An MLP trained on digits, recorded every epoch, with an auto-mode controller that checks
    every epoch but never converts (its patience exceeds the training): it only measures."""
    path = tmp_path_factory.mktemp("agree") / "run.h5"
    data = bs.zoo.load_dataset("digits", seed=0)
    model = bs.zoo.build_model("mlp", data.input_shape, data.num_classes, seed=0)
    config = bs.TrainConfig(epochs=EPOCHS, lr=3e-3)
    per_epoch = math.ceil(len(data.x_train) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    watch = bs.OIALRConfig(
        auto=True, check_every=per_epoch, lag=LAG, patience=10**6, beta=None,
        interval=per_epoch, plan=PLAN,
    )  # fmt: skip
    controller = bs.OIALR(model, optimizer, watch)
    with bs.record(model, path) as rec:
        bs.train(model, data, config, oialr=controller, recorder=rec, progress=False)
    assert controller.converted_at is None  # it measured, it did not act
    checks = [e for e in controller.events if e["event"] == "check"]
    return path, checks


def test_auto_mode_measures_the_analysis_stable_share(recording):
    path, checks = recording
    report = bs.analyze(path, bs.AnalysisConfig(lag=LAG), plan=PLAN)
    network = report.network.set_index("snapshot")
    measured = [n for n in report.plan.layers if n not in report.plan.excluded_layers]  # noqa: F841 (query)
    # check i runs after epoch i (snapshot i) and compares it with check i - LAG: its first
    # comparison is snapshot LAG + 1 against snapshot 1, so from there on the pairs coincide
    assert len(checks) == EPOCHS - LAG
    for i, check in enumerate(checks, start=LAG + 1):
        row = network.loc[i]
        assert check["mean_S"] == pytest.approx(row["mean_S"], abs=1e-5), i
        lag_rows = report.stability.query("pair == 'lag' and b == @i and layer in @measured")
        near_tau = (lag_rows["S"] - PLAN.tau).abs().min() < 1e-5
        if not near_tau:  # the float32 live S and the float64 offline S fall on one side of tau
            assert check["stable_share"] == pytest.approx(row["stable_share"], abs=1e-12), i
    shares = network["stable_share"].to_numpy()
    assert np.nanmax(shares) > 0 and np.nanmin(shares) < 1, "a recording where the share moves"


def test_the_delay_rule_over_auto_mode_shares_is_the_plans_delay(recording):
    path, checks = recording
    report = bs.analyze(path, bs.AnalysisConfig(lag=LAG), plan=PLAN)
    offline = report.network["stable_share"].to_numpy()
    delay = report.plan.delay_snapshot
    first = delay_start(offline, PLAN.share)
    assert delay == (None if first is None else int(report.network["snapshot"].iloc[first]))
    live = [c["stable_share"] for c in checks]
    start = delay_start(live, PLAN.share)  # the plan's horizon: the share holds to the end
    if delay is not None and delay >= LAG + 1:
        assert start is not None and start + LAG + 1 == delay
    # with patience, auto mode would convert where the first run of `patience` checks starts
    patience = 2
    first = delay_start(live, PLAN.share, patience)
    if first is not None:
        assert all(s >= PLAN.share for s in live[first : first + patience])
        assert not any(all(s >= PLAN.share for s in live[j : j + patience]) for j in range(first))


def test_plan_ranks_are_the_beta_rule_on_the_recorded_spectra(recording):
    path, _ = recording
    report = bs.analyze(path, bs.AnalysisConfig(lag=LAG), plan=PLAN)
    plan = report.plan
    at = plan.evidence["spectra_snapshot"]
    with bs.open_run(path) as run:
        for name, rank in plan.ranks.items():
            w = np.asarray(run.layer(name)[at], dtype=np.float64)
            s = np.linalg.svd(w, compute_uv=False)
            assert rank == int((s >= plan.beta * s[0]).sum()), name  # numpy oracle
            assert rank == rank_at_beta(s, plan.beta)
    ranks = report.ranks.query("snapshot == @at").set_index("layer")["rank_beta"]
    assert {n: ranks[n] for n in plan.ranks} == plan.ranks


def test_stable_share_is_the_parameter_weighted_share_of_defined_layers():
    # numpy by hand: layers of 100, 300 and 50 parameters; the NaN one is left out
    assert stable_share([0.995, 0.5, math.nan], [100, 300, 50], 0.99) == 100 / 400
    assert math.isnan(stable_share([math.nan], [10], 0.99))
    assert stable_share([0.99], [10], 0.99) == 1.0  # inclusive at tau
