"""Low-rank layers: exact conversion, both forward paths, rotation/truncation, gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import basis_stability.lowrank.layers as layers
from basis_stability import Recorder, open_run
from basis_stability.lowrank import (
    LowRankConv,
    LowRankFactor,
    LowRankLinear,
    LowRankMultiheadAttention,
    factor_of,
    factorize_,
)
from basis_stability.views import select_layers

ATOL = 1e-5


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


@pytest.fixture(params=[True, False], ids=["form-W", "thin"])
def forced_path(request, monkeypatch):
    monkeypatch.setattr(layers, "_cheaper_to_form", lambda factor, rows: request.param)
    return request.param


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)], ids=["wide", "tall", "square"])
def test_linear_from_dense_is_exact_on_both_paths(shape, forced_path):
    _seeded()
    out_f, in_f = shape
    dense = nn.Linear(in_f, out_f)
    low = LowRankLinear.from_dense(dense)
    x = torch.randn(3, 5, in_f)
    torch.testing.assert_close(low(x), dense(x), atol=ATOL, rtol=0)
    assert low.rank == min(shape)
    assert low.bias is dense.bias  # reused, so the optimizer keeps its state


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
def test_linear_to_dense_inverts_from_dense(shape):
    _seeded()
    dense = nn.Linear(shape[1], shape[0])
    back = LowRankLinear.from_dense(dense).to_dense()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, dense.weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(back.bias, dense.bias)


def test_linear_without_bias():
    _seeded()
    dense = nn.Linear(5, 4, bias=False)
    low = LowRankLinear.from_dense(dense)
    x = torch.randn(2, 5)
    torch.testing.assert_close(low(x), dense(x), atol=ATOL, rtol=0)
    assert low.to_dense().bias is None


CONVS = {
    "conv1d": lambda: nn.Conv1d(3, 5, 3),
    "conv1d-strided": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=2),
    "conv2d": lambda: nn.Conv2d(3, 8, 3, padding=1),
    "conv2d-tall": lambda: nn.Conv2d(2, 20, 2),  # out 20 > in * k * k = 8
    "conv2d-strided": lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=2),
    "conv2d-grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_from_dense_is_exact_on_both_paths(kind, forced_path):
    _seeded()
    dense = CONVS[kind]()
    low = LowRankConv.from_dense(dense)
    x = torch.randn(2, dense.in_channels, *([9] * (dense.weight.dim() - 2)))
    torch.testing.assert_close(low(x), dense(x), atol=ATOL, rtol=0)
    back = low.to_dense()
    assert type(back) is type(dense)
    torch.testing.assert_close(back(x), dense(x), atol=ATOL, rtol=0)


def test_grouped_conv_always_forms_w(monkeypatch):
    """A grouped conv has no thin path: even when thin is 'cheaper' it must use the dense W."""
    _seeded()
    dense = CONVS["conv2d-grouped"]()
    low = LowRankConv.from_dense(dense)
    monkeypatch.setattr(layers, "_cheaper_to_form", lambda factor, rows: False)
    calls = []
    monkeypatch.setattr(LowRankConv, "thin_weights", lambda self: calls.append(1) or 1 / 0)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(low(x), dense(x), atol=ATOL, rtol=0)
    assert not calls


def test_forward_paths_agree_after_training_like_update(monkeypatch):
    """With a non-diagonal S and k < n the form-W and thin paths still agree."""
    _seeded()
    lin = LowRankLinear.from_dense(nn.Linear(12, 9))
    conv = LowRankConv.from_dense(nn.Conv2d(3, 10, 3, padding=1))
    for module in (lin, conv):
        f = module.factor
        f.rotate_and_truncate_(4)
        with torch.no_grad():
            f.S.add_(torch.randn_like(f.S) * 0.3)
    xs = {lin: torch.randn(4, 12), conv: torch.randn(2, 3, 7, 7)}
    for module, x in xs.items():
        outs = []
        for form in (True, False):
            monkeypatch.setattr(layers, "_cheaper_to_form", lambda factor, rows, v=form: v)
            outs.append(module(x))
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
        ref = nn.functional.linear if module is lin else nn.functional.conv2d
        args = () if module is lin else (1, 1)
        torch.testing.assert_close(
            outs[0], ref(x, module.weight, module.bias, *args), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_from_dense_is_exact(batch_first):
    _seeded()
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    low = LowRankMultiheadAttention.from_dense(mha).eval()
    x = torch.randn(3, 5, 8)
    got, got_w = low(x, x, x)
    want, want_w = mha(x, x, x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_w, want_w, atol=ATOL, rtol=0)
    assert "in_proj_weight" not in dict(low.named_parameters())
    assert low.in_proj.S.shape == (8, 8)
    back = low.to_dense()
    assert type(back) is nn.MultiheadAttention
    torch.testing.assert_close(back(x, x, x)[0], want, atol=ATOL, rtol=0)


def _encoder_layer(batch_first: bool) -> nn.TransformerEncoderLayer:
    _seeded()
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no-grad"])
def test_mha_inside_transformer_encoder_layer(batch_first, train):
    """In eval/no_grad the encoder fast path reads self_attn.in_proj_weight directly."""
    dense = _encoder_layer(batch_first)
    low = _encoder_layer(batch_first)
    low.load_state_dict(dense.state_dict())
    report = factorize_(low)
    assert isinstance(low.self_attn, LowRankMultiheadAttention)
    assert isinstance(low.self_attn.out_proj, LowRankLinear)
    assert {"self_attn", "self_attn.out_proj", "linear1", "linear2"} <= set(report.converted)
    x = torch.randn(2, 4, 8)
    dense.train(train)
    low.train(train)
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(low(x), dense(x), atol=ATOL, rtol=0)


def _numpy_svd_of(S: torch.Tensor):  # noqa: N803
    return np.linalg.svd(S.detach().double().numpy())


def test_rotation_with_same_rank_leaves_w_unchanged_and_diagonalises_s():
    _seeded()
    f = LowRankFactor.from_weight(torch.randn(9, 6))
    with torch.no_grad():
        f.S.copy_(f.S + 0.5 * torch.randn(6, 6))
    before = f.dense().clone()
    rot = f.rotate_and_truncate_(6)
    torch.testing.assert_close(f.dense(), before, atol=ATOL, rtol=0)
    s = torch.diagonal(f.S.detach())
    torch.testing.assert_close(f.S.detach(), torch.diag(s))
    _, s_np, _ = _numpy_svd_of(rot.Up @ torch.diag(rot.s) @ rot.Vph)
    np.testing.assert_allclose(s.detach().numpy(), s_np, atol=1e-5)
    assert (rot.k_old, rot.k_new) == (6, 6)


@pytest.mark.parametrize("k_new", [1, 2, 3])
def test_truncation_removes_exactly_the_dropped_singular_values(k_new):
    _seeded(k_new)
    f = LowRankFactor.from_weight(torch.randn(6, 12, 3, 3))  # a conv weight, tall (108, 6)
    k = f.rank
    with torch.no_grad():
        f.S.copy_(torch.randn(k, k))
    _, s_np, _ = _numpy_svd_of(f.S)  # the oracle: spectrum of S before the cut
    before = f.dense().detach().double().clone()
    f.rotate_and_truncate_(k_new)
    after = f.dense().detach().double()
    lost = float(((before - after) ** 2).sum())
    np.testing.assert_allclose(lost, float((s_np[k_new:] ** 2).sum()), rtol=1e-4, atol=1e-6)
    assert f.rank == k_new
    assert f.U.shape[1] == k_new and f.Vh.shape[0] == k_new and f.S.shape == (k_new, k_new)
    np.testing.assert_allclose(torch.diagonal(f.S).detach().numpy(), s_np[:k_new], rtol=1e-5)


def test_rotate_and_truncate_rejects_bad_rank():
    f = LowRankFactor.from_weight(torch.randn(5, 3))
    for k_new in (0, 4):
        with pytest.raises(ValueError, match="k_new"):
            f.rotate_and_truncate_(k_new)


def test_gradients_flow_only_to_s_and_bias():
    _seeded()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))
    factorize_(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"0.factor.S", "0.bias", "2.factor.S", "2.bias"}
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers == {"0.factor.U", "0.factor.Vh", "2.factor.U", "2.factor.Vh"}
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, b in model.named_buffers():
        assert not b.requires_grad and b.grad is None, name


def test_recorder_records_the_effective_dense_weight(tmp_path):
    _seeded()
    dense = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 3)
    )
    names_dense = [v.name for v in select_layers(dense).views]
    low = copy.deepcopy(dense)
    factorize_(low)
    for name in ("0", "3"):  # a non-trivial S and a cut, so U S Vh != the original W
        f = factor_of(low.get_submodule(name))
        f.rotate_and_truncate_(max(1, f.rank - 1))
        with torch.no_grad():
            f.S.add_(0.1 * torch.randn_like(f.S))
    assert [v.name for v in select_layers(low).views] == names_dense
    path = tmp_path / "low.h5"
    with Recorder(low, path) as rec:
        rec.snapshot(epoch=1, step=1)
    with open_run(path) as run:
        assert sorted(run.layer_names) == sorted(names_dense)
        for view in select_layers(low).views:
            module = low.get_submodule(view.name)
            f = factor_of(module)
            u, s, vh = (t.detach().double().numpy() for t in (f.U, f.S, f.Vh))
            oracle = u @ s @ vh  # the tall matrix, independent of dense()/weight
            got = np.asarray(run.layer(view.name)[-1], dtype=np.float64)
            np.testing.assert_allclose(got, oracle, atol=1e-5)
