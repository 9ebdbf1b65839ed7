"""Recording most of a model or not: the coverage warning, the stored coverage, `bstab inspect`."""

from __future__ import annotations

import json
import logging

import h5py
import pytest
from torch import nn

from basis_stability.record.recorder import Recorder
from basis_stability.store.h5io import write_digest
from basis_stability.store.summary import summarize
from basis_stability.views import measure_coverage, select_layers

RECORDER_LOG = "basis_stability.record.recorder"


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == RECORDER_LOG and r.levelno == logging.WARNING
    ]


def test_recording_gpt2_whose_conv1d_layers_are_skipped_warns_and_names_them(tmp_path, caplog):
    model = _tiny_gpt2()
    with caplog.at_level(logging.WARNING, logger=RECORDER_LOG):
        Recorder(model, tmp_path / "run.h5").close()
    (message,) = _warnings(caplog)
    assert "most of the model is NOT recorded" in message
    for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):
        assert f"transformer.h.0.{name} (Conv1D," in message
    assert "register_view" in message
    # 2 blocks x (c_attn 32x96 + c_proj 32x32 + c_fc 32x128 + c_proj 128x32) + wte 100x32 +
    # wpe 32x32; the recorded lm_head is tied to wte and counts once
    assert "3,200 of the 28,800 parameters" in message


def test_inspect_shows_the_coverage_of_a_gpt2_run_below_half(tmp_path):
    path = tmp_path / "run.h5"
    Recorder(_tiny_gpt2(), path).close()
    text = summarize(path, scan=False)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("coverage")]
    assert "3,200 of 28,800 parameters in >= 2-D tensors (11.1%)" in line
    assert "most of the model is NOT recorded" in line
    assert "transformer.h.0.mlp.c_fc (Conv1D, 4,096)" in line


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
    cov = measure_coverage(model, select_layers(model).views)
    assert (cov.recorded_params, cov.eligible_2d_params, cov.largest_unrecorded) == (40, 40, [])
