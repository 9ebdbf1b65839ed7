"""Export: plain torch.nn copy with the same outputs, loadable without this package; MACs."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from basis_stability.exporting.factorized import compare_export, count_macs, export_factorized
from basis_stability.lowrank import factor_of, factorize_, low_rank_layers
from basis_stability.zoo import build_model


def _low_rank(name: str, input_shape=(1, 8, 8)) -> nn.Module:
    model = build_model(name, input_shape, 10, seed=0)
    factorize_(model)
    torch.manual_seed(1)
    for layer in low_rank_layers(model).values():  # cut and perturb: not the dense model any more
        f = factor_of(layer)
        f.rotate_and_truncate_(max(1, f.rank // 2))
        with torch.no_grad():
            f.S.add_(0.05 * torch.randn_like(f.S))
    return model.eval()


def _assert_plain_torch(model: nn.Module) -> None:
    """Every module below the root is a torch.nn class (the root is the user's own class)."""
    for name, m in model.named_modules():
        if name or type(m).__module__ != "basis_stability.zoo.models":
            assert type(m).__module__.startswith("torch.nn."), (name, type(m))


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("cnn", (2, 16)), ("vit-tiny", (1, 8, 8))],
)
def test_export_has_the_same_outputs_and_only_torch_modules(name, shape):
    model = _low_rank(name, shape)
    exported = export_factorized(model)
    _assert_plain_torch(exported)
    assert low_rank_layers(model)  # the original is untouched
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-4)


def test_exported_linear_is_two_thin_layers():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    factorize_(model)
    factor_of(model[0]).rotate_and_truncate_(3)
    factor_of(model[2]).rotate_and_truncate_(2)
    exported = export_factorized(model)
    shapes = [tuple(m.weight.shape) for m in exported.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(3, 12), (10, 3), (2, 10), (4, 2)]
    assert exported[0][0].bias is None and exported[0][1].bias is not None


def test_export_loads_in_a_process_without_basis_stability(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 20))
    factorize_(model)
    for layer in low_rank_layers(model).values():
        factor_of(layer).rotate_and_truncate_(3)
    exported = export_factorized(model)
    path = tmp_path / "model.pt"
    torch.save(exported, path)
    x = torch.randn(2, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["basis_stability"] = None  # any import of the package now fails
        import torch
        model = torch.load({str(path)!r}, weights_only=False)
        x = torch.load({str(tmp_path / "x.pt")!r})
        y = torch.load({str(tmp_path / "y.pt")!r})
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-4)
        assert not any(k.startswith("basis_stability") for k in sys.modules if sys.modules[k])
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_count_macs_by_hand():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),  # 8x8 -> 4x4: 4*4*4 outputs x 2*3*3
        nn.Conv2d(4, 4, 3, groups=2),  # 4x4 -> 2x2: 4*2*2 outputs x 2*3*3
        nn.Flatten(),
        nn.Linear(16, 5),  # 5 x 16
    )
    want = 64 * 18 + 16 * 18 + 5 * 16
    assert count_macs(model, torch.randn(3, 2, 8, 8)) == want  # per sample


def test_compare_export_reports_parameters_and_macs():
    dense = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8))
    low = copy.deepcopy(dense)
    factorize_(low)
    factor_of(low[0]).rotate_and_truncate_(4)
    factor_of(low[2]).rotate_and_truncate_(2)
    exported = export_factorized(low)
    report = compare_export(dense, exported, torch.randn(4, 20), repeats=3)
    assert report.params_dense == 20 * 16 + 16 + 16 * 8 + 8
    # layer 0 (tall 20x16 transposed): 20->4, 4->16 (+16); layer 2 (16x8): 16->2, 2->8 (+8)
    assert report.params_factorized == (20 * 4 + 4 * 16 + 16) + (16 * 2 + 2 * 8 + 8)
    assert report.macs_dense == 20 * 16 + 16 * 8
    assert report.macs_factorized == 20 * 4 + 4 * 16 + 16 * 2 + 2 * 8
    assert report.ms_dense > 0 and report.ms_factorized > 0
    assert report.speedup == pytest.approx(report.ms_dense / report.ms_factorized)
    assert "parameters 472 -> 216" in str(report)
