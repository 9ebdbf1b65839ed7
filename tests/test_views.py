"""Layer views (SPEC §1): which tall matrix each layer is, and which layers are selected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError, NoEligibleLayersError
from basis_stability.views import (
    LayerView,
    select_layers,
    select_state_dict,
    strip_wrapper_prefix,
    tall_shape,
    unwrap_model,
)


def _numpy_tall(w: np.ndarray) -> np.ndarray:
    """Oracle: keep the output dim, fold the rest, transpose when wide."""
    mat = w.reshape(w.shape[0], -1)
    return mat.T if mat.shape[0] < mat.shape[1] else mat


def _views(model: nn.Module, **kw) -> dict[str, LayerView]:
    return {v.name: v for v in select_layers(model, **kw).views}


def _skipped(model: nn.Module, **kw) -> dict[str, str]:
    return dict(select_layers(model, **kw).skipped)


class Mixed(nn.Module):
    """One of each layer type, with names a user would see."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 5, 3)
        self.conv2 = nn.Conv2d(3, 16, 3)
        self.conv3 = nn.Conv3d(1, 4, 2)
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        ((8, 4), ((8, 4), False)),  # Linear out > in: as is
        ((2, 8), ((8, 2), True)),  # Linear out < in: transposed
        ((5, 5), ((5, 5), False)),  # square: not transposed
        ((16, 3, 3, 3), ((27, 16), True)),  # Conv2d folds to (16, 27), wide
        ((64, 3, 3, 3), ((64, 27), False)),  # Conv2d folds to (64, 27), tall
        ((5, 6, 3), ((18, 5), True)),  # Conv1d
        ((40, 1, 2, 2, 2), ((40, 8), False)),  # Conv3d
    ],
)
def test_tall_shape_known_answers(orig, expected):
    assert tall_shape(orig) == expected


def test_linear_and_conv_views_are_tall_and_match_numpy_oracle():
    torch.manual_seed(0)
    model = Mixed()
    views = _views(model, types=["linear", "conv*"])
    params = dict(model.named_parameters())
    assert set(views) == {"conv1", "conv2", "conv3", "head", "attn.out_proj"}
    for view in views.values():
        w = params[view.param_name].detach()
        got = view.matrix(w).numpy()
        want = _numpy_tall(w.numpy())
        np.testing.assert_array_equal(got, want)
        m, n = view.shape
        assert got.shape == (m, n) and m >= n
        assert view.orig_shape == tuple(w.shape)
    assert views["head"].transposed and views["head"].shape == (8, 2)
    assert views["conv2"].transposed and views["conv2"].shape == (27, 16)
    assert views["conv1"].kind == "conv1d" and views["conv3"].kind == "conv3d"


def test_grouped_conv_folds_in_per_group_channels():
    conv = nn.Conv2d(4, 8, 3, groups=2)  # weight (8, 2, 3, 3)
    (view,) = select_layers(nn.Sequential(conv)).views
    assert view.orig_shape == (8, 2, 3, 3)
    assert view.shape == (18, 8) and view.transposed


def test_mha_in_proj_is_one_matrix_and_out_proj_a_linear():
    model = Mixed()
    views = _views(model, types=["mha", "linear"])
    in_proj = views["attn.in_proj"]
    assert (in_proj.param_name, in_proj.kind, in_proj.shape) == (
        "attn.in_proj_weight",
        "mha",
        (24, 8),
    )
    assert not in_proj.transposed
    out_proj = views["attn.out_proj"]
    assert (out_proj.param_name, out_proj.kind, out_proj.shape) == (
        "attn.out_proj.weight",
        "linear",
        (8, 8),
    )


def test_mha_with_separate_kdim_vdim_gives_q_k_v_matrices():
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    views = _views(nn.Sequential(attn), types=["mha"])
    assert {n: (v.param_name, v.shape) for n, v in views.items()} == {
        "0.q_proj": ("0.q_proj_weight", (8, 8)),
        "0.k_proj": ("0.k_proj_weight", (8, 4)),
        "0.v_proj": ("0.v_proj_weight", (8, 6)),
    }
    np.testing.assert_array_equal(
        views["0.v_proj"].matrix(attn.v_proj_weight.detach()).numpy(),
        attn.v_proj_weight.detach().numpy(),
    )


def test_embedding_skipped_unless_selected_by_type_or_name():
    model = Mixed()
    assert "emb" not in _views(model)
    assert "recorded only when selected" in _skipped(model)["emb"]
    by_type = _views(model, types=["embedding"])
    assert set(by_type) == {"emb"}
    assert by_type["emb"].shape == (20, 6) and by_type["emb"].kind == "embedding"
    assert set(_views(model, include=["emb"])) == {"emb"}
    # a wildcard that happens to match is not an explicit choice (SPEC §1)
    assert "emb" not in _views(model, include=["*"])
    assert "emb" in _views(model, types=[nn.Embedding, "linear"])


def test_every_skipped_layer_is_reported_with_a_reason():
    model = Mixed()
    sel = select_layers(model, include=["conv*"], exclude=["conv3"])
    assert [v.name for v in sel.views] == ["conv1", "conv2"]
    skipped = dict(sel.skipped)
    assert skipped["norm"] == "no matrix view for LayerNorm (weight, bias)"
    assert "exclude" in skipped["conv3"]
    assert "include" in skipped["head"]
    assert "include" in skipped["attn.in_proj"]
    # every module with parameters is either recorded or reported
    names = {v.name for v in sel.views} | set(skipped)
    assert names == {
        "emb",
        "conv1",
        "conv2",
        "conv3",
        "attn.in_proj",
        "attn.out_proj",
        "norm",
        "head",
    }
    assert "norm: no matrix view for LayerNorm" in sel.describe_skipped()


def test_include_glob_and_regex():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    assert list(_views(model, include=["1*"])) == ["1", "10", "11"]
    assert list(_views(model, include=["re:[0-3]"])) == ["0", "1", "2", "3"]
    # regexes match the whole name, not a prefix
    assert list(_views(model, include=["re:1"])) == ["1"]
    assert list(_views(model, exclude=["re:\\d\\d|[2-9]"])) == ["0", "1"]


def test_types_filter_and_aliases():
    model = Mixed()
    assert set(_views(model, types=["conv*"])) == {"conv1", "conv2", "conv3"}
    assert set(_views(model, types=["conv"])) == {"conv1", "conv2", "conv3"}
    assert set(_views(model, types=["Conv2d"])) == {"conv2"}
    assert set(_views(model, types=[nn.Conv1d])) == {"conv1"}
    assert set(_views(model, types=["MultiheadAttention"])) == {"attn.in_proj"}
    assert "type 'linear' not selected" in _skipped(model, types=["conv*"])["head"]


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"types": ["lstm"]}, "types"),
        ({"types": [nn.LSTM]}, "types"),
        ({"include": ["re:("]}, "include"),
        ({"exclude": ["re:[a"]}, "exclude"),
    ],
)
def test_bad_selection_arguments_raise_config_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ConfigError, match=f"`{arg}`"):
        select_layers(Mixed(), **kwargs)


def test_no_eligible_layers_lists_candidates():
    model = nn.Sequential(nn.LayerNorm(4), nn.Embedding(10, 4))
    with pytest.raises(NoEligibleLayersError) as info:
        select_layers(model)
    msg = str(info.value)
    assert "0 (no matrix view for LayerNorm" in msg
    assert "1 (embedding layers are recorded only when selected" in msg


def _small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_data_parallel_wrapper_is_unwrapped():
    model = _small()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    assert select_layers(wrapped).views == select_layers(model).views
    assert [v.param_name for v in select_layers(wrapped).views] == ["0.weight", "2.weight"]


def test_torch_compile_wrapper_is_unwrapped():
    model = _small()
    compiled = torch.compile(model)  # never run: only the wrapper object matters
    assert compiled is not model
    assert unwrap_model(compiled) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    assert select_layers(compiled).views == select_layers(model).views


def test_select_state_dict_strips_wrapper_prefixes_and_guesses_kinds():
    model = Mixed()
    shapes = {f"module.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["_orig_mod.module.extra.weight"] = (3, 9)
    sel = select_state_dict(shapes)
    views = {v.name: v for v in sel.views}
    from_model = _views(model, types=["linear", "conv*", "mha"])
    for name, view in from_model.items():
        assert views[name] == view, name
    # a 2-D weight cannot be told from a Linear: the embedding is kept as one
    assert views["emb"].kind == "linear" and views["emb"].param_name == "emb.weight"
    assert views["extra"].param_name == "extra.weight"
    assert views["extra"].shape == (9, 3) and views["extra"].transposed
    skipped = dict(sel.skipped)
    assert "not a layer weight matrix" in skipped["head.bias"]
    assert "norm.weight" in skipped


def test_select_state_dict_with_separate_qkv_and_filters():
    shapes = {
        "module.attn.q_proj_weight": (8, 8),
        "module.attn.k_proj_weight": (8, 4),
        "module.fc.weight": (2, 8),
    }
    sel = select_state_dict(shapes, types=["mha"])
    assert [(v.name, v.param_name) for v in sel.views] == [
        ("attn.q_proj", "attn.q_proj_weight"),
        ("attn.k_proj", "attn.k_proj_weight"),
    ]
    with pytest.raises(NoEligibleLayersError, match="fc"):
        select_state_dict(shapes, include=["nothing*"])


@pytest.mark.parametrize(
    ("key", "bare"),
    [
        ("module.fc.weight", "fc.weight"),
        ("module._orig_mod.fc.weight", "fc.weight"),  # DDP(compile(m))
        ("_orig_mod.module.fc.weight", "fc.weight"),  # compile(DDP(m)): was left "module.fc..."
        ("fc.module.weight", "fc.module.weight"),  # only leading prefixes go
    ],
)
def test_strip_wrapper_prefix_handles_compiled_ddp_keys(key, bare):
    assert strip_wrapper_prefix(key) == bare
