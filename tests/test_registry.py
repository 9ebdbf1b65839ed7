"""The layer registry: one table read by the recorder, factorize_, OIALR and the export.

Oracles: the tall matrix written out in numpy, the dense layer's own outputs, and the rule that a
factorised layer's factor is exactly the matrix the recorder stores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability import registry
from basis_stability.errors import ConfigError
from basis_stability.exporting.factorized import count_macs, export_factorized
from basis_stability.lowrank import densify_, factor_of, factorize_, low_rank_layers
from basis_stability.lowrank.layers import LowRankConv
from basis_stability.lowrank.surgery import FactorizeConfig, eligible_layers
from basis_stability.recording.recorder import Recorder
from basis_stability.registry import IN_OUT, OUT_IN, Matrix, register_layer, register_view
from basis_stability.store import open_run
from basis_stability.views import select_layers


@pytest.fixture
def clean_registry():
    """Entries a test registers are gone afterwards."""
    by_type, by_name = dict(registry._BY_TYPE), dict(registry._BY_NAME)
    yield
    registry._BY_TYPE.clear()
    registry._BY_TYPE.update(by_type)
    registry._BY_NAME.clear()
    registry._BY_NAME.update(by_name)


def np_tall(weight: np.ndarray, stored_in_out: bool = False) -> np.ndarray:
    """Oracle: the (out, in*) matrix, transposed when wide."""
    mat = weight.T if stored_in_out else weight.reshape(weight.shape[0], -1)
    return mat if mat.shape[0] >= mat.shape[1] else mat.T


class InOut(nn.Module):
    """A projection stored (in, out), as transformers' Conv1D, but unknown to the registry."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (1, 7)])
def test_in_out_tall_shape_is_that_of_the_linear_transpose(shape):
    w = torch.randn(*shape)
    (m, n), transposed = registry.tall_shape(shape, IN_OUT)
    got = registry.to_tall(w, transposed).numpy()
    np.testing.assert_array_equal(got, np_tall(w.numpy(), stored_in_out=True))
    assert (m, n) == got.shape and m >= n


def test_orientation_must_be_one_of_the_two_and_in_out_only_for_2d():
    with pytest.raises(ConfigError, match=r"`orientation`.*'sideways'"):
        Matrix("weight", orientation="sideways")
    with pytest.raises(ConfigError, match=r"2-D weight for orientation 'in_out'.*\(2, 3, 4\)"):
        registry.tall_shape((2, 3, 4), IN_OUT)


def test_register_view_with_orientation_records_the_linear_matrix(tmp_path, clean_registry):
    register_view(InOut, "linear", lambda _: [("", "kernel")], orientation=IN_OUT)
    model = nn.Sequential(InOut(3, 3), nn.ReLU(), InOut(3, 6))
    (first, second) = select_layers(model).views
    assert (first.orientation, first.transposed, second.shape) == (IN_OUT, True, (6, 3))
    path = tmp_path / "run.h5"
    Recorder(model, path).close()
    with open_run(path) as run:
        for name, module in (("0", model[0]), ("2", model[2])):
            want = module.kernel.detach().numpy()
            np.testing.assert_array_equal(run.layer(name)[0], np_tall(want, stored_in_out=True))
            np.testing.assert_array_equal(run.layer(name).original(0), want)


def test_an_orientation_contradicting_the_weight_is_refused(clean_registry):
    class Proj(nn.Linear):  # declares in/out features, stores (out, in) like any Linear
        pass

    register_layer(Proj, "linear", [Matrix("weight", orientation=IN_OUT)])
    with pytest.raises(ConfigError) as err:
        select_layers(nn.Sequential(Proj(3, 5)))
    msg = str(err.value)
    assert "layer 0 (Proj, 5 outputs, 3 inputs) stored 'in_out' to have shape (3, 5)" in msg
    assert "but it is (5, 3)" in msg and "orientation='out_in'" in msg


def test_in_out_on_a_conv_weight_is_refused_with_the_layer_name(clean_registry):
    class Odd(nn.Conv2d):
        pass

    register_layer(Odd, "conv2d", [Matrix("weight", orientation=IN_OUT)])
    with pytest.raises(ConfigError, match=r"Layer 0 \(Odd\): Expected a 2-D weight"):
        select_layers(nn.Sequential(Odd(2, 4, 3)))


def test_registering_a_type_twice_needs_replace(clean_registry):
    register_layer(InOut, "linear", [Matrix("kernel", orientation=IN_OUT)])
    with pytest.raises(ConfigError, match=r"InOut is registered already.*replace=True"):
        register_layer(InOut, "linear", [Matrix("kernel")])
    register_layer(InOut, "linear", [Matrix("kernel")], replace=True)
    assert registry.lookup(InOut(2, 3)).matrices_of(None)[0].orientation == OUT_IN
    with pytest.raises(ConfigError, match=r"Matrix entries but got 'kernel'"):
        register_layer(InOut, "linear", ["kernel"], replace=True)


def test_a_recordable_type_without_low_rank_form_is_skipped_with_its_reason(clean_registry):
    register_layer(InOut, "linear", [Matrix("kernel", orientation=IN_OUT)], refuse="no form yet")
    model = nn.Sequential(nn.Linear(4, 6), InOut(6, 5))
    report = factorize_(model)
    assert list(report.converted) == ["0"] and ("1", "no form yet") in report.skipped
    with pytest.raises(ConfigError, match=r"`include` to name factorisable layers but 1 "):
        factorize_(nn.Sequential(nn.Linear(4, 6), InOut(6, 5)), FactorizeConfig(include=["1"]))


@pytest.mark.parametrize(
    ("conv", "why"),
    [
        (nn.Conv2d(4, 8, 3, groups=2), "grouped convolution (groups=2)"),
        (nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
    ],
)
def test_every_recordable_conv_is_factorised_or_refused_with_a_reason(conv, why):
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, *([9] * (conv.weight.dim() - 2))))
    assert [v.name for v in select_layers(model).views] == ["0", "2"]  # recorded either way
    _, skipped = eligible_layers(model, FactorizeConfig())
    assert dict(skipped)["0"].startswith(why)
    with pytest.raises(ConfigError, match=r"0 \(Conv.d\) cannot be factorised"):
        factorize_(model, FactorizeConfig(include=["0"]))


def test_conv3d_factorises_exactly_and_densifies_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 5, 2, padding=1), nn.ReLU(), nn.Conv3d(5, 4, (1, 2, 2)))
    x = torch.randn(2, 3, 4, 5, 5)
    want = model(x).detach()
    report = factorize_(model)
    assert sorted(report.converted) == ["0", "2"]
    assert all(isinstance(m, LowRankConv) for m in low_rank_layers(model).values())
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(export_factorized(model)(x), want, rtol=1e-4, atol=1e-5)
    densify_(model)
    assert [type(m) for m in model] == [nn.Conv3d, nn.ReLU, nn.Conv3d]
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_embeddings_are_opt_in_and_never_factorised():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    sel = select_layers(model)
    assert [v.name for v in sel.views] == ["1"]
    assert [v.name for v in select_layers(model, types=["embedding", "linear"]).views] == ["0", "1"]
    report = factorize_(model)
    assert "lookup table" in dict(report.skipped)["0"]
    with pytest.raises(ConfigError, match=r"0 \(Embedding\) cannot be factorised"):
        factorize_(model, FactorizeConfig(include=["0"]))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(idx))))


def test_a_head_tied_to_an_embedding_is_the_embedding():
    model = Tied()
    sel = select_layers(model)
    assert [v.name for v in sel.views] == ["body"]
    reasons = dict(sel.skipped)
    assert "recorded only when selected" in reasons["head"] and "tied: emb" in reasons["head"]
    views = select_layers(model, types=["embedding", "linear"]).views
    assert [(v.name, v.kind) for v in views] == [("emb", "embedding"), ("body", "linear")]
    assert select_layers(model, include=["head"]).views[0].kind == "embedding"
    with pytest.raises(ConfigError, match=r"head and emb are the same tensor"):
        select_layers(model, include=["emb", "head"])


def test_a_tied_head_stays_dense_and_tied():
    model = Tied()
    report = factorize_(model)
    assert list(report.converted) == ["body"]
    assert "tied to emb" in dict(report.skipped)["head"]
    assert model.head.weight is model.emb.weight


def test_each_factor_is_the_matrix_the_recorder_stores():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(96, 10), nn.Linear(10, 12))
    attn = nn.MultiheadAttention(8, 2)
    both = nn.ModuleDict({"net": model, "attn": attn})
    views = {v.name: v for v in select_layers(both).views}
    weights = {v.name: both.get_parameter(v.param_name).detach().clone() for v in views.values()}
    factorize_(both)
    for name, module in low_rank_layers(both).items():
        key = f"{name}.in_proj" if name == "attn" else name
        tall = factor_of(module).tall().detach()
        torch.testing.assert_close(tall, views[key].matrix(weights[key]), rtol=0, atol=1e-5)


def test_count_macs_reads_the_registry():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_macs(model, torch.randn(3, 8)) == 8 * 16 + 16 * 4
    conv = nn.Sequential(nn.Conv3d(2, 3, 2))
    assert count_macs(conv, torch.randn(1, 2, 3, 3, 3)) == 3 * 8 * (2 * 8)


def test_stability_of_a_square_layer_does_not_depend_on_its_orientation():
    """Why a checkpoint import (no module to say how a square weight is stored) is still right:
    S(a, b) = trace(B_a^T B_b) / n is the same for the transposed pair."""
    from basis_stability.analysis.stability import decompose, stability

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    b = a + 0.3 * torch.randn(16, 16, generator=gen, dtype=torch.float64)
    s = stability(decompose(a, torch.float64), decompose(b, torch.float64)).value
    s_t = stability(decompose(a.T, torch.float64), decompose(b.T, torch.float64)).value
    assert 0.5 < s < 0.999
    assert s_t == pytest.approx(s, abs=1e-12)


def test_selecting_layers_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, torch.nn as nn\n"
        "from basis_stability.views import select_layers\n"
        "from basis_stability.lowrank import factorize_\n"
        "m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4))\n"
        "select_layers(m); factorize_(m)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
