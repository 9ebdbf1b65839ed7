"""The zoo: built-in offline datasets (digits, MNIST-1D, co2) and the built-in models.

The datasets are checked against sklearn's digits split with numpy here, for their shapes,
dtypes and classes, for determinism by seed, and for loading with every socket refused; the
models for their outputs, their parameter counts, their seeds and the errors they raise.
(co2 windows and the forecaster's maths are in test_forecaster.py.)
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError
from basis_stability.zoo import DATASETS, MODELS, build_model, check_pair, load_dataset
from basis_stability.zoo import datasets as zd
from basis_stability.zoo import models as zm


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def mnist1d():
    pytest.importorskip("mnist1d")
    return load_dataset("mnist1d", seed=0)


# ---------------------------------------------------------------------- digits
def test_digits_is_sklearns_digits_split_80_20_and_standardised_by_the_training_part(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, target = raw.images.astype(np.float32), raw.target
    order = np.random.default_rng(0).permutation(len(images))
    cut = round(0.8 * len(images))  # 1438 of 1797
    train, test = order[:cut], order[cut:]
    mean, std = images[train].mean(), images[train].std()

    assert digits.name == "digits" and digits.task == "classification"
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    np.testing.assert_array_equal(digits.y_train.numpy(), target[train])
    np.testing.assert_array_equal(digits.y_test.numpy(), target[test])
    want = (images[test] - mean) / std
    np.testing.assert_allclose(digits.x_test.numpy()[:, 0], want, rtol=0, atol=1e-5)
    assert abs(float(digits.x_train.mean())) < 1e-5
    assert float(digits.x_train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert set(digits.y_train.tolist()) == set(range(10))


def test_digits_is_deterministic_by_seed_and_another_seed_splits_otherwise(digits):
    again = load_dataset("digits", seed=0)
    assert _digest(again.x_train, again.x_test) == _digest(digits.x_train, digits.x_test)
    assert torch.equal(again.y_train, digits.y_train)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)
    # the same 1797 samples, only split otherwise
    both = np.concatenate([other.y_train.numpy(), other.y_test.numpy()])
    mine = np.concatenate([digits.y_train.numpy(), digits.y_test.numpy()])
    np.testing.assert_array_equal(np.bincount(both), np.bincount(mine))


# ---------------------------------------------------------------------- mnist1d
def test_mnist1d_shapes_dtypes_classes(mnist1d):
    assert mnist1d.name == "mnist1d" and mnist1d.task == "classification"
    assert mnist1d.x_train.shape == (4000, 1, 40) and mnist1d.x_test.shape == (1000, 1, 40)
    assert mnist1d.input_shape == (1, 40) and mnist1d.num_classes == 10
    assert mnist1d.x_train.dtype == torch.float32 and mnist1d.y_test.dtype == torch.int64
    assert set(mnist1d.y_train.tolist()) == set(range(10))
    assert abs(float(mnist1d.x_train.mean())) < 1e-4  # standardised by the training part
    assert float(mnist1d.x_train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------- offline, always
_OFFLINE = """
import json, socket, sys

def refused(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = socket.socket.connect_ex = refused
socket.create_connection = socket.getaddrinfo = refused
import hashlib
from basis_stability.zoo import load_dataset

def digest(d):
    h = hashlib.sha256()
    for t in (d.x_train, d.y_train, d.x_test, d.y_test):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()

out = {}
for name in sys.argv[1:]:
    d = load_dataset(name, seed=0)
    out[name] = [digest(d), list(d.x_train.shape), d.task]
print(json.dumps(out))
"""


def test_every_dataset_loads_with_the_network_refused_and_equals_an_in_process_load(
    digits, mnist1d
):
    pytest.importorskip("statsmodels")
    names = sorted(DATASETS)
    assert names == ["co2", "digits", "mnist1d"]
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE, *names], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for name, data in (("digits", digits), ("mnist1d", mnist1d)):
        want = _digest(data.x_train, data.y_train, data.x_test, data.y_test)
        assert got[name][0] == want, name  # same seed, same data, in another process too
    assert got["co2"][1:] == [[1768, 1, 52], "regression"]


def test_unknown_dataset_names_the_choices_and_tasks_cover_every_dataset():
    with pytest.raises(ConfigError, match="dataset.*digits, mnist1d, co2"):
        load_dataset("cifar10")
    assert set(zd.TASKS) == set(DATASETS)
    assert set(zm.TASKS) == set(MODELS)


def test_fill_gaps_interpolates_linearly_and_holds_the_ends():
    got = zd.fill_gaps(np.array([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan]))
    np.testing.assert_array_equal(got, [1.0, 1.0, 2.0, 3.0, 4.0, 4.0])
    with pytest.raises(ConfigError, match="only NaNs"):
        zd.fill_gaps(np.full(3, np.nan))


# ---------------------------------------------------------------------- models
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)], ids=["image", "signal"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "vit-tiny"])
def test_classifiers_map_a_batch_to_one_logit_per_class(name: str, shape: tuple[int, ...]):
    model = build_model(name, shape, num_classes=7, seed=0)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 7) and torch.isfinite(out).all()
    convs = {type(m) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    if name != "mlp":  # a 1-D input gets 1-D convolutions, an image 2-D ones
        assert convs == {nn.Conv2d if len(shape) == 3 else nn.Conv1d}


BLOCK = ["self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"]


@pytest.mark.parametrize(
    ("name", "shape", "layers"),
    [
        ("mlp", (1, 8, 8), ["fc1", "fc2", "head"]),
        ("cnn", (1, 8, 8), ["conv1", "conv2", "conv3", "fc1", "head"]),
        (
            "vit-tiny",
            (1, 8, 8),
            ["patch_embed", *[f"blocks.{b}.{p}" for b in (0, 1) for p in BLOCK], "head"],
        ),
        (
            "forecaster",
            (1, 24),
            ["embed", *[f"blocks.{b}.{p}" for b in (0, 1) for p in BLOCK], "head"],
        ),
    ],
)
def test_builtin_models_record_named_layers_not_sequential_indices(name, shape, layers):
    from basis_stability.views import select_layers

    model = build_model(name, shape, 6, seed=0)
    assert [view.name for view in select_layers(model).views] == layers


def test_vit_blocks_start_equal_as_nn_transformer_encoder_clones_did():
    model = build_model("vit-tiny", (1, 8, 8), 10, seed=0)
    first, second = (dict(block.state_dict()) for block in model.blocks)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_mlp_parameter_count_is_the_formula():
    d, w, c = 64, 256, 10
    want = (d * w + w) + (w * w + w) + (w * c + c)
    assert _n_params(build_model("mlp", (1, 8, 8), c)) == want
    assert _n_params(build_model("mlp", (1, 40), c)) == want - (64 - 40) * w


def test_same_seed_same_weights_other_seed_other_weights_and_the_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("cnn", (1, 8, 8), 10, seed=0)
    after = torch.rand(3)
    assert torch.equal(before, after)  # building drew from a forked generator
    b = build_model("cnn", (1, 8, 8), 10, seed=0)
    c = build_model("cnn", (1, 8, 8), 10, seed=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_forecaster_starts_near_repeating_the_last_value():
    model = build_model("forecaster", (1, 52), 8, seed=0)
    x = torch.randn(4, 1, 52)
    out = model(x)
    assert out.shape == (4, 8)
    last = x[:, 0, -1:].expand(-1, 8)
    assert (out - last).abs().max() < 0.1 * x.abs().max()  # the head starts small
    with torch.no_grad():
        model.head.weight.zero_()
    torch.testing.assert_close(model(x), last, rtol=0, atol=1e-6)  # exactly the last value


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: build_model("resnet", (1, 8, 8), 10), "model.*mlp, cnn, vit-tiny, forecaster"),
        (lambda: build_model("mlp", (64,), 10), "input_shape"),
        (lambda: build_model("forecaster", (1, 8, 8), 10), "input_shape"),
        (lambda: build_model("vit-tiny", (1, 9, 9), 10), "patch"),
    ],
    ids=["unknown", "1-d", "forecaster-image", "patch"],
)
def test_bad_model_requests_are_config_errors_naming_the_argument(call, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        call()


def test_check_pair_refuses_a_model_of_another_task_and_names_both_fixes():
    check_pair("mlp", "digits")
    check_pair("forecaster", "co2")
    check_pair("nonesuch", "co2")  # unknown names are build_model's and load_dataset's to name
    with pytest.raises(ConfigError) as caught:
        check_pair("forecaster", "digits")
    text = str(caught.value)
    assert "classification model" in text and "regression model" in text
    for name in ("mlp", "cnn", "vit-tiny", "co2"):  # the models for digits, the data for it
        assert name in text, name
    with pytest.raises(ConfigError) as caught:
        check_pair("cnn", "co2")
    assert "forecaster" in str(caught.value) and "digits" in str(caught.value)


def test_vit_tiny_token_count_follows_the_patch():
    model = build_model("vit-tiny", (1, 8, 8), 10)
    assert model.pos_embed.shape == (1, (8 // 2) ** 2 + 1, 64)  # 2x2 patches and a class token
    signal = build_model("vit-tiny", (1, 40), 10)
    assert signal.pos_embed.shape == (1, 40 // 4 + 1, 64)
    assert math.prod(signal.patch_embed.weight.shape) == 64 * 1 * 4
