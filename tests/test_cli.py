"""The `bstab` CLI: the jobs it runs, and one clear line plus a non-zero exit for bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab

from basis_stability import open_run

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints_spec" / "reference_v1.h5"


def test_help_lists_commands():
    result = bstab("--help")
    assert result.exit_code == 0
    for command in ("record", "inspect", "validate"):
        assert command in result.output


@pytest.mark.parametrize("model", ["mlp", "cnn", "vit-tiny"])
def test_record_builtin_models_then_inspect_and_validate(model, tmp_path):
    out = tmp_path / f"{model}.h5"
    result = bstab("record", "--model", model, "--epochs", "2", "--no-progress", "-o", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    with open_run(out) as run:
        assert run.n_snapshots == 3  # initial + 2 epochs
        np.testing.assert_array_equal(run.epochs, [0, 1, 2])
        assert run.metric_names == ["loss", "acc", "val_loss", "val_acc", "lr"]
        kinds = {i.kind for i in run.layers}
        names = run.layer_names
    expected_kinds = {
        "mlp": {"linear"},
        "cnn": {"conv2d", "linear"},
        "vit-tiny": {"conv2d", "mha", "linear"},
    }[model]
    assert kinds == expected_kinds
    if model == "vit-tiny":
        assert "blocks.0.self_attn.in_proj" in names
        assert "blocks.0.self_attn.out_proj" in names
    summary = bstab("inspect", out)
    assert summary.exit_code == 0
    for name in names:
        assert name in summary.output
    assert "snapshots  3" in summary.output
    assert bstab("validate", out).exit_code == 0


def test_record_step_schedule_stamps_steps_and_fractional_epochs(tmp_path):
    out = tmp_path / "steps.h5"
    result = bstab(
        "record",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--schedule",
        "every:10",
        "--no-progress",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        # digits: 1438 training samples / 64 per batch -> 23 steps; snapshots at 0, 10, 20
        np.testing.assert_array_equal(run.steps, [0, 10, 20])
        np.testing.assert_allclose(run.epochs, [0, 10 / 23, 20 / 23])
        assert "batch_loss" in run.metric_names


def test_record_float16_storage(tmp_path):
    out = tmp_path / "half.h5"
    assert (
        bstab(
            "record",
            "--model",
            "mlp",
            "--epochs",
            "1",
            "--dtype",
            "float16",
            "--no-progress",
            "-o",
            out,
        ).exit_code
        == 0
    )
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        assert f["layers/fc1"].dtype == np.float16


def test_default_output_path_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert bstab("record", "--model", "mlp", "--epochs", "1", "--no-progress").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "mlp-digits-seed0-2.h5",
        "mlp-digits-seed0.h5",
    ]


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious")
    result = bstab("record", "--model", "mlp", "--epochs", "1", "--no-progress", "-o", out)
    assert_clean_failure(result, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    result = bstab(
        "record", "--model", "mlp", "--epochs", "1", "--no-progress", "-o", out, "--force"
    )
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        assert run.n_snapshots == 2


def test_list_shows_selected_and_skipped_layers():
    result = bstab("record", "--model", "vit-tiny", "--list")
    assert result.exit_code == 0
    assert "blocks.0.self_attn.in_proj" in result.output
    assert "no matrix view for LayerNorm" in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--include", "nothing*"], ["No layer of model Sequential was selected", "not matched"]),
        (["--schedule", "sometimes"], ["Expected `--schedule`", "every:10"]),
        (["--schedule", "every:0"], ["Expected `n` to be a positive integer"]),
        (["--include", "re:(["], ["not a regular expression"]),
        (["--types", "lstm"], ["Expected `--types`", "linear"]),
    ],
)
def test_record_bad_options(args, fragments, tmp_path):
    result = bstab(
        "record", "--model", "mlp", "--epochs", "1", "--no-progress", "-o", tmp_path / "x.h5", *args
    )
    assert_clean_failure(result, *fragments)
    assert not (tmp_path / "x.h5").exists()


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(4)
    newer = tmp_path / "newer.h5"
    shutil.copy(REFERENCE, newer)
    with h5py.File(newer, "r+", libver="latest") as f:
        f.attrs["format_version"] = "2.0"
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(REFERENCE.read_bytes()[: REFERENCE.stat().st_size // 2])
    return {
        "missing": (tmp_path / "missing.h5", ["No run file at"]),
        "directory": (tmp_path, ["is a directory"]),
        "text": (text, ["is not an HDF5 file"]),
        "foreign": (foreign, ["not a basis_stability run"]),
        "newer": (newer, ["format version 2.0", "Upgrade basis_stability"]),
        "truncated": (truncated, ["truncated or corrupt"]),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "foreign", "newer", "truncated"])
def test_inspect_bad_files(kind, tmp_path):
    path, fragments = _bad_files(tmp_path)[kind]
    assert_clean_failure(bstab("inspect", path), *fragments)


@pytest.mark.parametrize("kind", ["missing", "text", "foreign", "newer", "truncated"])
def test_validate_bad_files_exit_nonzero(kind, tmp_path):
    path, _ = _bad_files(tmp_path)[kind]
    assert_clean_failure(bstab("validate", path), "does not conform")


def test_inspect_flags_nan_weights(tmp_path):
    path = tmp_path / "nan.h5"
    shutil.copy(REFERENCE, path)
    with h5py.File(path, "r+", libver="latest") as f:
        f["layers/conv"][2, 1, 1] = np.inf
    result = bstab("inspect", path)
    assert result.exit_code == 0
    assert "1 snapshot(s) !" in result.output
    assert "NaN/Inf" in result.output


def _save_checkpoints(folder: Path, epochs: list[int], seed: int = 0) -> dict[int, dict]:
    folder.mkdir()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    saved = {}
    for e in epochs:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(sd, folder / f"epoch_{e}.pt")
        saved[e] = sd
    return saved


def test_record_from_checkpoints_in_natural_order(tmp_path):
    saved = _save_checkpoints(tmp_path / "ckpts", [1, 2, 10, 3])
    out = tmp_path / "ck.h5"
    result = bstab("record", "--from-checkpoints", f"{tmp_path}/ckpts/epoch_*.pt", "-o", out)
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        np.testing.assert_array_equal(run.epochs, [1, 2, 3, 10])
        for t, e in enumerate([1, 2, 3, 10]):
            np.testing.assert_array_equal(run.layer("0").original(t), saved[e]["0.weight"])


def test_record_from_checkpoints_bad_input(tmp_path):
    result = bstab("record", "--from-checkpoints", f"{tmp_path}/none_*.pt", "-o", tmp_path / "x.h5")
    assert_clean_failure(result, "matched nothing")
    _save_checkpoints(tmp_path / "ckpts", [1, 2])
    torch.save({"other.weight": torch.zeros(3, 3)}, tmp_path / "ckpts" / "epoch_3.pt")
    result = bstab(
        "record", "--from-checkpoints", f"{tmp_path}/ckpts/epoch_*.pt", "-o", tmp_path / "x.h5"
    )
    assert_clean_failure(result, "differing keys", "epoch_3.pt")
    assert not (tmp_path / "x.h5").exists()


def test_record_from_checkpoints_list_shows_the_selection_and_writes_nothing(tmp_path):
    # broke once in the CLI split: a wrong relative import only this path reaches
    _save_checkpoints(tmp_path / "ckpts", [1, 2])
    out = tmp_path / "x.h5"
    result = bstab(
        "record", "--from-checkpoints", f"{tmp_path}/ckpts/epoch_*.pt", "--list", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "2 layers selected:" in result.output
    # Linear(6, 4) and Linear(4, 3) are stored transposed: their tall shapes are 6x4 and 4x3
    assert re.search(r"^\s+0\s+linear\s+6x4$", result.output, re.M)
    assert re.search(r"^\s+2\s+linear\s+4x3$", result.output, re.M)
    assert "0.bias" in result.output  # skipped, with its reason
    assert not out.exists()


def test_progress_bars_stay_out_of_output_that_is_not_a_terminal(tmp_path):
    from basis_stability.cli._options import show_progress

    result = bstab("record", "--model", "mlp", "--epochs", "2", "-o", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output
    assert "%|" not in result.output  # no tqdm bar redraws in a log
    assert show_progress(no_progress=True) is False
