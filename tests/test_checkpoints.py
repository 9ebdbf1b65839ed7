"""Checkpoint import: natural order, epochs, exact weights, and checks before writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from basis_stability.errors import CheckpointError, NoEligibleLayersError, RunExistsError
from basis_stability.recording import RecordConfig, find_checkpoints, record_checkpoints
from basis_stability.store import open_run

N = 12


def _state(epoch: int) -> dict[str, torch.Tensor]:
    """A small model's state dict whose weights differ per epoch."""
    torch.manual_seed(epoch)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_pt(folder: Path, states: dict[int, dict[str, torch.Tensor]]) -> None:
    """Mix the layouts users have: flat, nested with scalars, and DDP-prefixed."""
    for e, sd in states.items():
        if e % 3 == 0:
            obj = {"epoch": e, "loss": 1.0 / e, "state_dict": sd}
        elif e % 3 == 1:
            obj = {f"module.{k}": v for k, v in sd.items()}
        else:
            obj = sd
        torch.save(obj, folder / f"epoch_{e}.pt")


def _save_safetensors(folder: Path, states: dict[int, dict[str, torch.Tensor]]) -> None:
    for e, sd in states.items():
        save_file(sd, str(folder / f"epoch_{e}.safetensors"))


def _assert_run_matches(run_path: Path, states: dict[int, dict[str, torch.Tensor]]) -> None:
    with open_run(run_path) as run:
        assert run.layer_names == ["0", "2"]
        assert run.n_snapshots == N
        np.testing.assert_array_equal(run.epochs, np.arange(1, N + 1))
        for t, e in enumerate(range(1, N + 1)):
            for name in run.layer_names:
                want = states[e][f"{name}.weight"].numpy()
                np.testing.assert_array_equal(run.layer(name).original(t), want)
        skipped = dict(map(tuple, run.config["metadata"]["skipped"]))
        assert set(skipped) == {"0.bias", "2.bias", "3.weight", "3.bias"}


@pytest.fixture
def states() -> dict[int, dict[str, torch.Tensor]]:
    return {e: _state(e) for e in range(1, N + 1)}


def test_find_checkpoints_is_in_natural_order(tmp_path: Path, states):
    _save_pt(tmp_path, states)
    names = [p.name for p in find_checkpoints(str(tmp_path / "epoch_*.pt"))]
    assert names == [f"epoch_{e}.pt" for e in range(1, N + 1)]


def test_pt_checkpoints_round_trip_with_epochs_and_metrics(tmp_path: Path, states):
    _save_pt(tmp_path, states)
    out = tmp_path / "run.h5"
    assert record_checkpoints(str(tmp_path / "epoch_*.pt"), out) == out
    _assert_run_matches(out, states)
    with open_run(out) as run:
        assert run.metric_names == ["loss"]
        loss = run.metrics_array()[:, 0]
        want = [1.0 / e if e % 3 == 0 else np.nan for e in range(1, N + 1)]
        np.testing.assert_array_equal(loss, want)
        assert run.config["metadata"]["files"][:3] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]


def test_safetensors_checkpoints_round_trip(tmp_path: Path, states):
    _save_safetensors(tmp_path, states)
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "epoch_*.safetensors"), out)
    _assert_run_matches(out, states)


def test_bfloat16_import_matches_torch_rounding(tmp_path: Path, states):
    _save_safetensors(tmp_path, states)
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "*.safetensors"), out, RecordConfig(dtype="bfloat16"))
    with open_run(out) as run:
        got = run.layer("2").original(-1)
    want = states[N]["2.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("change", ["missing", "reshaped"])
def test_differing_checkpoints_raise_before_writing(tmp_path: Path, states, fmt, change):
    odd = states[7]
    if change == "missing":
        del odd["2.weight"]
    else:
        odd["0.weight"] = torch.zeros(4, 2, 5, 5)
    save = _save_pt if fmt == "pt" else _save_safetensors
    save(tmp_path, states)
    out = tmp_path / "out" / "run.h5"
    with pytest.raises(CheckpointError, match="epoch_7"):
        record_checkpoints(str(tmp_path / f"epoch_*.{fmt}"), out)
    assert not out.exists() and not out.parent.exists()


def test_glob_matching_nothing_raises(tmp_path: Path):
    with pytest.raises(CheckpointError, match="matched nothing"):
        record_checkpoints(str(tmp_path / "epoch_*.pt"), tmp_path / "run.h5")
    assert not (tmp_path / "run.h5").exists()


def test_non_checkpoint_file_in_the_glob_raises(tmp_path: Path, states):
    _save_pt(tmp_path, {1: states[1], 2: states[2]})
    (tmp_path / "notes.txt").write_text("lr=0.1\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        record_checkpoints(str(tmp_path / "*"), tmp_path / "run.h5")
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.parametrize(
    ("fmt", "bad"), [("pt", b"not a pickle"), ("pt", None), ("safetensors", b"\x08garbage")]
)
def test_unreadable_checkpoint_raises(tmp_path: Path, states, fmt, bad):
    save = _save_pt if fmt == "pt" else _save_safetensors
    save(tmp_path, {1: states[1], 2: states[2]})
    if bad is None:
        torch.save(nn.Linear(2, 2), tmp_path / "epoch_3.pt")  # a model, not a state dict
    else:
        (tmp_path / f"epoch_3.{fmt}").write_bytes(bad)
    with pytest.raises(CheckpointError, match=f"epoch_3.{fmt}"):
        record_checkpoints(str(tmp_path / f"epoch_*.{fmt}"), tmp_path / "run.h5")
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_selection_errors_are_not_reported_as_unreadable_files(tmp_path: Path, states, fmt):
    save = _save_pt if fmt == "pt" else _save_safetensors
    save(tmp_path, {1: states[1], 2: states[2]})
    with pytest.raises(NoEligibleLayersError, match="0 \\(not matched"):
        record_checkpoints(
            str(tmp_path / f"*.{fmt}"), tmp_path / "run.h5", RecordConfig(include=["nope"])
        )


def test_include_selects_layers_by_bare_name(tmp_path: Path, states):
    _save_pt(tmp_path, states)
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "epoch_*.pt"), out, RecordConfig(include=["2"]))
    with open_run(out) as run:
        assert run.layer_names == ["2"]
        np.testing.assert_array_equal(run.layer("2").original(0), states[1]["2.weight"].numpy())


def test_existing_output_is_refused_without_force(tmp_path: Path, states):
    _save_pt(tmp_path, {1: states[1]})
    out = tmp_path / "run.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(RunExistsError):
        record_checkpoints(str(tmp_path / "*.pt"), out)
    assert out.read_bytes() == b"keep me"
    record_checkpoints(str(tmp_path / "*.pt"), out, force=True)
    with open_run(out) as run:
        assert run.n_snapshots == 1


def test_epoch_and_step_entries_count_when_the_name_has_none(tmp_path: Path, states):
    # ckpt_9: no epoch/step in the name or the file, so unknown (it was epoch 9: a guess from
    # the last number in the name)
    torch.save({"epoch": 2.5, "step": 40, "model": states[1]}, tmp_path / "ckpt_7.pt")
    torch.save({"model_state_dict": states[2]}, tmp_path / "ckpt_9.pt")
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "ckpt_*.pt"), out)
    with open_run(out) as run:
        np.testing.assert_array_equal(run.epochs, [2.5, np.nan])
        np.testing.assert_array_equal(run.steps, [40, -1])
        np.testing.assert_array_equal(run.layer("0").original(1), states[2]["0.weight"].numpy())
