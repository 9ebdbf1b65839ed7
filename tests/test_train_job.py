"""`TrainJob` -> `OIALRConfig`: the preset's defaults from Python, and `overrides`."""

from __future__ import annotations

import pytest

from basis_stability.errors import ConfigError
from basis_stability.jobs import RecordJob, TrainJob, build, oialr_config
from basis_stability.training import TrainConfig


def _config(**job):
    train = TrainConfig(epochs=12)
    model, _ = build(RecordJob(model="mlp", dataset="digits", train=train))
    return oialr_config(
        TrainJob(model="mlp", dataset="digits", train=train, **job), model, steps_per_epoch=10
    )


def test_the_reference_preset_from_python_gets_its_own_moments_not_reset():
    """A TrainJob left at its defaults used to give the reference preset bstab's `reset`."""
    assert _config(preset="reference").moments == "slice"
    assert _config(delay="2", beta=0.2).moments == "reset"
    assert _config(preset="reference", moments="reset").moments == "reset"  # explicit wins


def test_overrides_set_config_fields_on_top_of_the_preset():
    cfg = _config(delay="2", beta=0.2, overrides={"first_cut": "one_interval_later"})
    assert cfg.first_cut == "one_interval_later" and cfg.delay == 20 and cfg.beta == 0.2
    ref = _config(preset="reference", overrides={"dense_when_larger": True})
    assert ref.dense_when_larger and ref.progressive == 0.1  # the rest stays the preset's


def test_unknown_or_invalid_overrides_are_clear_errors():
    with pytest.raises(ConfigError, match="overrides.*first_cutt.*Use some of"):
        _config(delay="2", beta=0.2, overrides={"first_cutt": "at_conversion"})
    with pytest.raises(ConfigError, match="first_cut"):  # checked as the config checks it
        _config(delay="2", beta=0.2, overrides={"first_cut": "never"})


def test_target_share_picks_auto_modes_beta_by_the_share_rule():
    cfg = _config(target_share=0.2)
    assert cfg.auto and cfg.plan.beta_rule == "share" and cfg.plan.target_share == 0.2
    assert _config().plan.beta_rule == "energy"  # the default rule is unchanged


@pytest.mark.parametrize(
    "job",
    [
        {"target_share": 0.2, "delay": "2", "beta": 0.2},
        {"target_share": 0.2, "preset": "reference"},
        {"target_share": 0.2, "auto": False, "delay": "2"},
        {"target_share": 1.5},
    ],
)
def test_target_share_outside_auto_mode_or_out_of_range_is_a_clear_error(job):
    with pytest.raises(ConfigError, match="`target_share`"):
        _config(**job)
