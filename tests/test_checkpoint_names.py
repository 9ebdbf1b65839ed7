"""Checkpoints' epochs and steps: from the name's epoch/step words, else the file's own entries,
else unknown; the write order that follows them; the table the CLI prints; clean refusals."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab
from safetensors.torch import save_file

from basis_stability.errors import CheckpointError
from basis_stability.recording import record_checkpoints
from basis_stability.recording.checkpoints import position_from_name, scan_checkpoints
from basis_stability.store import open_run


def _sd(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"0.weight": torch.randn(4, 6), "0.bias": torch.randn(4)}


# ------------------------------------------------------------------ names
@pytest.mark.parametrize(
    ("name", "epoch", "step"),
    [
        ("epoch=1-step=23.pt", 1.0, 23),  # Lightning: was epoch 23 (the last number)
        ("ckpt-epoch1-acc0.91.pt", 1.0, None),  # was epoch 91
        ("epoch_7.pt", 7.0, None),
        ("epoch7.pt", 7.0, None),
        ("Epoch-3.pth", 3.0, None),
        ("EPOCH=12.ckpt", 12.0, None),
        ("ep 4.pt", 4.0, None),
        ("ep_4.pt", 4.0, None),
        ("epoch=2.5.pt", 2.5, None),
        ("step=40.pt", None, 40),
        ("step_40.pt", None, 40),
        ("Step40.bin", None, 40),
        ("global_step=120.ckpt", None, 120),
        ("epoch01_step0045.pt", 1.0, 45),
        ("model_final_7.pt", None, None),  # was epoch 7
        ("deep3.pt", None, None),  # "ep" inside a word is no epoch
        ("resnet50-v2.pt", None, None),
    ],
)
def test_epoch_and_step_come_from_the_epoch_and_step_words_of_the_name(name, epoch, step):
    assert position_from_name(name) == (epoch, step)


def test_lightning_names_give_epoch_and_step_not_the_last_number(tmp_path):
    for e, s in [(0, 11), (1, 23), (2, 35)]:
        torch.save(_sd(e), tmp_path / f"epoch={e}-step={s}.ckpt")
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "*.ckpt"), out)
    with open_run(out) as run:
        np.testing.assert_array_equal(run.epochs, [0, 1, 2])
        np.testing.assert_array_equal(run.steps, [11, 23, 35])


def test_names_without_epoch_or_step_are_unknown_not_a_guess(tmp_path):
    torch.save(_sd(0), tmp_path / "ckpt-acc0.91.pt")
    torch.save(_sd(1), tmp_path / "model_final_7.pt")
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "*.pt"), out)
    with open_run(out) as run:
        assert np.isnan(run.epochs).all()
        np.testing.assert_array_equal(run.steps, [-1, -1])


def test_the_files_own_entries_count_when_the_name_has_none(tmp_path):
    torch.save({"epoch": 3, "global_step": 30, "state_dict": _sd(0)}, tmp_path / "a.pt")
    torch.save({"epoch": 1, "global_step": 10, "state_dict": _sd(1)}, tmp_path / "b.pt")
    found = scan_checkpoints(str(tmp_path / "*.pt"))
    assert [f.name for f in found.files] == ["b.pt", "a.pt"]  # step order, not name order
    assert (found.epochs, found.steps, found.order) == ([1.0, 3.0], [10, 30], "step")


def test_order_follows_the_steps_not_the_names(tmp_path):
    # natural name order is run-b, run-c, run-a; the steps say run-a, run-b, run-c
    for tag, step in [("a", 5), ("b", 50), ("c", 500)]:
        torch.save(_sd(step), tmp_path / f"run-{tag}-step={step}.pt")
    (tmp_path / "run-a-step=5.pt").rename(tmp_path / "zz-step=5.pt")
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "*.pt"), out)
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, [5, 50, 500])
        np.testing.assert_array_equal(run.layer("0").original(0), _sd(5)["0.weight"].numpy())
        assert run.config["metadata"]["files"] == [
            "zz-step=5.pt",
            "run-b-step=50.pt",
            "run-c-step=500.pt",
        ]


def test_order_follows_epochs_when_some_steps_are_unknown(tmp_path):
    torch.save(_sd(0), tmp_path / "b-epoch_2.pt")
    torch.save(_sd(1), tmp_path / "a-epoch_10-step=99.pt")
    torch.save(_sd(2), tmp_path / "c-epoch_1.pt")
    found = scan_checkpoints(str(tmp_path / "*.pt"))
    assert found.order == "epoch"
    assert found.epochs == [1.0, 2.0, 10.0]
    assert found.steps == [-1, -1, 99]


@pytest.mark.parametrize("list_only", [False, True])
def test_the_cli_prints_which_file_became_which_epoch_and_step(tmp_path, list_only):
    for e, s in [(1, 23), (0, 11)]:
        torch.save(_sd(e), tmp_path / f"epoch={e}-step={s}.ckpt")
    torch.save(_sd(5), tmp_path / "last.ckpt")
    out = tmp_path / "run.h5"
    result = bstab(
        "record", "--from-checkpoints", tmp_path / "*.ckpt", "-o", out, "--no-progress",
        *(["--list"] if list_only else []),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 checkpoints, in epoch order" not in result.output  # last.ckpt has neither
    assert "in file-name order" in result.output
    assert re.search(r"^\s+epoch=0-step=11\.ckpt\s+0\s+11$", result.output, re.M), result.output
    assert re.search(r"^\s+epoch=1-step=23\.ckpt\s+1\s+23$", result.output, re.M), result.output
    assert re.search(r"^\s+last\.ckpt\s+\?\s+\?$", result.output, re.M), result.output
    assert "epoch unknown for 1 of them" in result.output
    assert out.exists() != list_only


# ------------------------------------------------------------------ bad epoch/step entries
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("global_step", 1e30),  # beyond int64
        ("step", 2.5),
        ("step", -3),
        ("step", True),
        ("epoch", True),
        ("epoch", float("nan")),
        ("epoch", -1.0),
        ("epoch", "three"),
    ],
)
def test_bad_epoch_or_step_entries_are_named_with_the_file(tmp_path, key, value):
    path = tmp_path / "ckpt_1.pt"
    torch.save({key: value, "state_dict": _sd(0)}, path)
    out = tmp_path / "run.h5"
    with pytest.raises(CheckpointError, match=re.escape(f"`{key}` in {path}")):
        record_checkpoints(str(tmp_path / "*.pt"), out)
    assert not out.exists()
    result = bstab("record", "--from-checkpoints", tmp_path / "*.pt", "-o", out)
    assert_clean_failure(result, f"`{key}`", str(path))
    assert not out.exists()


def test_a_step_too_large_in_the_name_is_refused(tmp_path):
    torch.save(_sd(0), tmp_path / f"step={2**64}.pt")
    with pytest.raises(CheckpointError, match="step in the file name"):
        scan_checkpoints(str(tmp_path / "*.pt"))


def test_integral_tensor_and_float_steps_are_accepted(tmp_path):
    torch.save({"global_step": torch.tensor(7), "epoch": 1, "model": _sd(0)}, tmp_path / "a.pt")
    torch.save({"global_step": 14.0, "epoch": 2.0, "model": _sd(1)}, tmp_path / "b.pt")
    found = scan_checkpoints(str(tmp_path / "*.pt"))
    assert found.steps == [7, 14] and found.epochs == [1.0, 2.0]


def test_a_model_buffer_named_step_is_no_position(tmp_path):
    torch.save({**_sd(0), "step": torch.tensor(2.5)}, tmp_path / "epoch_1.pt")
    found = scan_checkpoints(str(tmp_path / "*.pt"))
    assert found.steps == [-1] and found.epochs == [1.0]


# ------------------------------------------------------------------ unreadable files
def test_a_legacy_format_checkpoint_is_read(tmp_path):
    # was: "mmap can only be used with files saved with ..._use_new_zipfile_serialization=True"
    sd = _sd(3)
    torch.save(sd, tmp_path / "epoch_1.pt", _use_new_zipfile_serialization=False)
    torch.save(_sd(4), tmp_path / "epoch_2.pt")
    out = tmp_path / "run.h5"
    result = bstab("record", "--from-checkpoints", tmp_path / "*.pt", "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        np.testing.assert_array_equal(run.epochs, [1, 2])
        np.testing.assert_array_equal(run.layer("0").original(0), sd["0.weight"].numpy())


@pytest.mark.parametrize(
    ("suffix", "content", "reason"),
    [
        (".pt", b"", "it is empty (0 bytes)"),
        (".pt", b"hello, not a checkpoint", "neither torch's zip format nor its legacy"),
        (".pt", b"PK\x03\x04garbage", "neither torch's zip format nor its legacy"),
        (".safetensors", b"", "it is empty (0 bytes)"),
        (".safetensors", b"\xff" * 20, "its header"),
    ],
)
def test_empty_and_garbage_files_get_one_clear_line(tmp_path, suffix, content, reason):
    path = tmp_path / f"epoch_1{suffix}"
    path.write_bytes(content)
    out = tmp_path / "run.h5"
    result = bstab("record", "--from-checkpoints", path, "-o", out)
    fix = "torch.save(state_dict, path)" if suffix == ".pt" else "save_file(state_dict, path)"
    text = assert_clean_failure(result, str(path), "we can read", reason, "re-save it with")
    assert fix in text
    assert "mmap" not in text and "zipfile" not in text.replace("zip format", "")
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_pickled_model_is_refused_with_the_state_dict_fix(tmp_path):
    path = tmp_path / "epoch_1.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    result = bstab("record", "--from-checkpoints", path, "-o", tmp_path / "run.h5")
    assert_clean_failure(result, str(path), "torch.save(model.state_dict(), path)")
    assert len(result.output.strip().splitlines()) == 1


def test_a_good_safetensors_set_still_reads(tmp_path):
    for e in (1, 2):
        save_file(_sd(e), str(tmp_path / f"epoch_{e}.safetensors"))
    out = tmp_path / "run.h5"
    record_checkpoints(str(tmp_path / "*.safetensors"), out)
    with open_run(out) as run:
        np.testing.assert_array_equal(run.epochs, [1, 2])
        assert not math.isnan(run.epochs[0])
