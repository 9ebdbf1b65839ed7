"""Model surgery: which layers factorize_ converts, the reasons for the others, densify_."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError, NoEligibleLayersError
from basis_stability.lowrank import (
    FactorizeConfig,
    LowRankConv,
    LowRankLinear,
    LowRankMultiheadAttention,
    densify_,
    eligible_layers,
    factorize_,
    low_rank_layers,
)
from basis_stability.zoo import build_model

LOW_RANK = (LowRankLinear, LowRankConv, LowRankMultiheadAttention)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    # 0: 10 -> 16, 2: 16 -> 16, 4: 10 -> 128 (tall 128x10, aspect 12.8), 5: 128 -> 10 (head)
    return nn.Sequential(
        nn.Linear(10, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.Linear(16, 10),
        nn.Linear(10, 128),
        nn.Linear(128, 10),
    )


def _skipped(report) -> dict[str, str]:
    return dict(report.skipped)


def test_factorize_converts_eligible_layers_and_reports_the_aspect_limit():
    model = _mlp()
    report = factorize_(model)
    skipped = _skipped(report)
    assert set(skipped) == {"4", "5"}  # 128x10 both ways: tall aspect 12.8 > 10
    assert "aspect ratio 128/10" in skipped["4"] and "> 10" in skipped["4"]
    assert set(report.converted) == {"0", "2", "3"}
    for name in ("0", "2", "3"):
        assert isinstance(model.get_submodule(name), LowRankLinear)
    for name in ("4", "5"):
        assert type(model.get_submodule(name)) is nn.Linear
    assert [m for _, m in report.swapped] == [report.converted[n] for n in ("0", "2", "3")]
    assert "kept full-rank 4" in str(report)


def test_aspect_limit_can_be_raised():
    report = factorize_(_mlp(), FactorizeConfig(aspect_limit=13))
    assert set(report.converted) == {"0", "2", "3", "4", "5"}
    assert report.skipped == []


@pytest.mark.parametrize(
    ("config", "converted", "reason"),
    [
        (FactorizeConfig(keep_first=True), {"2", "3"}, {"0": "keep_first"}),
        (FactorizeConfig(keep_last=True), {"0", "2"}, {"3": "keep_last"}),
        (FactorizeConfig(keep_first=True, keep_last=True), {"2"}, {"0": "first", "3": "last"}),
        (FactorizeConfig(include=["2", "3"]), {"2", "3"}, {"0": "not included"}),
        (FactorizeConfig(exclude=["[03]"]), {"2"}, {"0": "excluded", "3": "excluded"}),
    ],
)
def test_keep_and_name_options(config, converted, reason):
    report = factorize_(_mlp(), config)
    assert set(report.converted) == converted
    skipped = _skipped(report)
    for name, fragment in reason.items():
        assert fragment in skipped[name]


def test_filter_fn_has_the_last_word():
    report = factorize_(_mlp(), filter_fn=lambda name, m: m.in_features != 16)
    assert set(report.converted) == {"0"}
    assert _skipped(report)["2"] == "rejected by filter_fn"
    assert _skipped(report)["3"] == "rejected by filter_fn"


def test_eligible_layers_does_not_touch_the_model():
    model = _mlp()
    chosen, skipped = eligible_layers(model, FactorizeConfig())
    assert [n for n, _ in chosen] == ["0", "2", "3"]
    assert not low_rank_layers(model)


def test_grouped_conv_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3))
    report = factorize_(model)
    assert set(report.converted) == {"1"}
    assert "grouped" in _skipped(report)["0"]


def test_factorize_twice_converts_nothing_new():
    model = _mlp()
    factorize_(model)
    with pytest.raises(NoEligibleLayersError):
        factorize_(model)


def test_no_eligible_layer_raises():
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU())  # aspect 32
    with pytest.raises(NoEligibleLayersError, match="aspect ratio"):
        factorize_(model)
    with pytest.raises(NoEligibleLayersError, match="no Linear/Conv/attention"):
        factorize_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_bad_aspect_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="aspect_limit"):
        FactorizeConfig(aspect_limit=0.5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit-tiny"])
def test_builtin_models_keep_their_outputs_through_factorize_and_densify(name):
    dense = build_model(name, (1, 8, 8), 10, seed=0).eval()
    low = copy.deepcopy(dense)
    report = factorize_(low)
    assert report.converted
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(low(x), want, atol=1e-4, rtol=0)
    assert set(low_rank_layers(low)) == set(report.converted)
    assert densify_(low) is low
    assert not any(isinstance(m, LOW_RANK) for m in low.modules())
    assert [type(m) for m in low.modules()] == [type(m) for m in dense.modules()]
    with torch.no_grad():
        torch.testing.assert_close(low(x), want, atol=1e-4, rtol=0)
    assert set(dict(low.named_parameters())) == set(dict(dense.named_parameters()))


def test_vit_attention_and_its_out_proj_are_both_converted():
    model = build_model("vit-tiny", (1, 8, 8), 10, seed=0)
    report = factorize_(model)
    attn = [n for n, m in report.converted.items() if isinstance(m, LowRankMultiheadAttention)]
    assert attn
    for name in attn:
        assert isinstance(model.get_submodule(name).out_proj, LowRankLinear)
        assert f"{name}.out_proj" in report.converted
