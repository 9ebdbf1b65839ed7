"""Recording most of a model or not: the coverage warning, the stored coverage, `bstab inspect`."""

from __future__ import annotations

import json
import logging

import h5py
import pytest
import torch
from torch import nn

from basis_stability.recording.recorder import Recorder
from basis_stability.store.h5io import write_digest
from basis_stability.store.summary import summarize
from basis_stability.views import measure_coverage, select_layers

RECORDER_LOG = "basis_stability.recording.recorder"


class _Kernel(nn.Module):
    """A layer type the registry does not know: its 64x64 matrix is not recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


def _mostly_unknown() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 8), _Kernel(), nn.Sequential(_Kernel()))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == RECORDER_LOG and r.levelno == logging.WARNING
    ]


def test_recording_a_model_of_mostly_unregistered_layers_warns_and_names_them(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=RECORDER_LOG):
        Recorder(_mostly_unknown(), tmp_path / "run.h5").close()
    (message,) = _warnings(caplog)
    assert "most of the model is NOT recorded" in message
    for name in ("1", "2.0"):
        assert f"{name} (_Kernel, 4,096)" in message
    assert "register_view" in message
    assert "512 of the 8,704 parameters" in message  # Linear 8x64 of 512 + 2 x 64x64


def test_inspect_shows_the_coverage_of_a_run_below_half(tmp_path):
    path = tmp_path / "run.h5"
    Recorder(_mostly_unknown(), path).close()
    text = summarize(path, scan=False)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("coverage")]
    assert "512 of 8,704 parameters in >= 2-D tensors (5.9%)" in line
    assert "most of the model is NOT recorded" in line
    assert "1 (_Kernel, 4,096)" in line


def test_an_mlp_of_linear_layers_is_fully_covered_and_does_not_warn(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    path = tmp_path / "run.h5"
    with caplog.at_level(logging.WARNING, logger=RECORDER_LOG):
        Recorder(model, path).close()
    assert _warnings(caplog) == []
    (line,) = [ln for ln in summarize(path, scan=False).splitlines() if ln.startswith("coverage")]
    assert line == "coverage   192 of 192 parameters in >= 2-D tensors (100.0%)"


def test_a_run_without_stored_coverage_prints_no_coverage_line(tmp_path):
    path = tmp_path / "run.h5"
    Recorder(nn.Linear(4, 3), path).close()
    with h5py.File(path, "r+") as f:  # drop the key, as in runs recorded before it existed
        cfg = json.loads(f.attrs["config"])
        assert "coverage" in cfg
        del cfg["coverage"]
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
        write_digest(f)
    assert "coverage" not in summarize(path, scan=False)


def test_coverage_counts_a_tied_weight_once_and_as_recorded():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    views = select_layers(model, types=["embedding"]).views
    assert [v.name for v in views] == ["emb"]  # once, under the first holder's name
    cov = measure_coverage(model, views)
    assert (cov.recorded_params, cov.eligible_2d_params, cov.largest_unrecorded) == (40, 40, [])
