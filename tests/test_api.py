"""The curated public API: every advertised name resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import basis_stability as bs


def test_every_public_name_resolves():
    for name in bs.__all__:
        assert getattr(bs, name) is not None, name
    assert callable(bs.analyze) and callable(bs.export) and callable(bs.plots.stability_heatmap)


def test_import_is_light():
    code = (
        "import sys, basis_stability\n"
        "heavy = [m for m in ('matplotlib', 'h5py', 'click', 'pandas', 'torch') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _compact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = bs.OIALR(model, opt, bs.OIALRConfig(delay=1, interval=1, beta=0.3)).attach()
    x = torch.randn(32, 12)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    oialr.close()
    return model, x


def test_export_saves_a_model_that_computes_what_the_trained_one_does(tmp_path):
    model, x = _compact(tmp_path)
    path = tmp_path / "out" / "compact.pt"  # the folder is created
    exported = bs.export(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)
    assert [p.name for p in path.parent.iterdir()] == ["compact.pt"]  # no temporary left


def test_export_refuses_an_existing_file_and_force_replaces_it(tmp_path):
    model, x = _compact(tmp_path)
    path = tmp_path / "compact.pt"
    path.write_bytes(b"an earlier model")
    with pytest.raises(bs.BstabError, match="already exists") as info:
        bs.export(model, path)
    assert set(info.value.arguments) == {"path", "force"}
    assert path.read_bytes() == b"an earlier model"
    bs.export(model, path, force=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(path, weights_only=False)(x), model(x))


def test_export_to_a_folder_names_the_argument(tmp_path):
    model, _ = _compact(tmp_path)
    with pytest.raises(bs.BstabError, match="`path`"):
        bs.export(model, tmp_path, force=True)
    assert list(tmp_path.iterdir()) == []


def _digits_mlp():
    data = bs.zoo.load_dataset("digits")
    return bs.zoo.build_model("mlp", data.input_shape, data.num_classes), data


@pytest.mark.parametrize(
    ("call", "argument", "fragment"),
    [
        (lambda p: bs.analyze(123), "path", "but got 123"),
        (lambda p: bs.analyze(p, {"lag": 2}), "config", "AnalysisConfig(**config)"),
        (lambda p: bs.analyze(p, engine="gram"), "engine", "an EngineConfig (or None)"),
        (lambda p: bs.analyze(p, plan={"tau": 0.9}), "plan", "PlanConfig(**plan)"),
        (lambda p: bs.record(nn.Linear(3, 3), None), "path", "a file path"),
        (lambda p: bs.record({"w": 1}, p / "new.h5"), "model", "but got a dict"),
        (lambda p: bs.record(nn.Linear(3, 3), p / "new.h5", dtyp="float16"), "dtyp", "`dtype`?"),
        (lambda p: bs.record(nn.Linear(3, 3), p / "new.h5", {"dtype": "float16"}), "config", ""),
        (lambda p: bs.train(nn.Linear(3, 3), (1, 2)), "data", "but got a tuple"),
        (lambda p: bs.train(*_digits_mlp(), {"epochs": 1}), "config", "TrainConfig(**config)"),
        (lambda p: bs.train(*_digits_mlp(), oialr="junk"), "oialr", "but got 'junk'"),
        (lambda p: bs.train(*_digits_mlp(), oialr=5), "oialr", "but got 5"),
        (lambda p: bs.OIALR(nn.Linear(3, 3), None, "auto"), "config", "an OIALRConfig"),
        (lambda p: bs.export("model"), "model", "but got a str"),
    ],
)
def test_a_wrong_argument_to_a_verb_is_a_clear_error_naming_it(tmp_path, call, argument, fragment):
    run = tmp_path / "run.h5"
    with bs.record(nn.Linear(4, 3), run) as rec:
        rec.snapshot(epoch=1)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(bs.BstabError) as info:
        call(run)
    assert argument in info.value.arguments, str(info.value)
    assert f"`{argument}`" in str(info.value) and fragment in str(info.value)
    assert sorted(tmp_path.iterdir()) == before  # nothing written
