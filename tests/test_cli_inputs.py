"""Hostile input to `bstab record`/`train`/`export`/`validate`: one clean line, nothing written.

Every failure must exit non-zero with one message naming the option, the value and the fix: no
traceback and no "Unexpected ..." (what the CLI says about a bug).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_clean_failure, bstab

from basis_stability import open_run
from basis_stability.recommend.plan import Plan
from basis_stability.store.lock import WriterLock

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints_spec" / "reference_v1.h5"
FAST = ("--model", "mlp", "--epochs", "1", "--batch-size", "128", "--no-progress")


# ------------------------------------------------------------------ numbers: seeds, lr, delay
@pytest.mark.parametrize("command", ["record", "train"])
@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**32), "abc"])
def test_seed_outside_what_numpy_and_torch_take_is_refused(command, seed, tmp_path):
    out = tmp_path / "x.h5"
    result = bstab(command, *FAST, "--seed", seed, "-o", out)
    assert_clean_failure(result, "--seed", repr(seed), "[0, 2**32)")
    assert not out.exists()


def test_largest_seed_is_accepted(tmp_path):
    out = tmp_path / "x.h5"
    result = bstab("record", *FAST, "--seed", str(2**32 - 1), "-o", out)
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        assert run.config["metadata"]["job"]["train"]["seed"] == 2**32 - 1


@pytest.mark.parametrize("lr", ["inf", "nan", "1e400", "-1", "0"])
def test_lr_that_is_not_a_finite_positive_number_is_refused(lr, tmp_path):
    out = tmp_path / "x.h5"
    assert_clean_failure(bstab("record", *FAST, "--lr", lr, "-o", out), "--lr", repr(lr))
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--delay", "1e400"),  # overflows to inf: was "Unexpected OverflowError"
        ("--delay", "inf"),
        ("--delay", "nan"),
        ("--delay", "-3"),
        ("--delay", "-5steps"),
        ("--interval", "inf"),
        ("--interval", "-1"),
    ],
)
def test_delay_and_interval_that_are_not_finite_and_non_negative_are_refused(
    option, value, tmp_path
):
    out = tmp_path / "x.h5"
    extra = () if option == "--delay" else ("--delay", "0")
    result = bstab("train", *FAST, option, value, *extra, "-o", out)
    assert_clean_failure(result, f"Expected `{option}`", repr(value), "finite, non-negative")
    assert not out.exists()


# ------------------------------------------------------------------ output paths
@pytest.mark.parametrize("command", ["record", "train", "export"])
@pytest.mark.parametrize("below", ["x.h5", "sub/x.h5"])
def test_output_under_a_regular_file_is_refused(command, below, tmp_path):
    blocker = tmp_path / "FILE"
    blocker.write_bytes(b"precious")
    out = blocker / below
    if command == "export":
        run = tmp_path / "run.h5"
        shutil.copy(REFERENCE, run)
        result = bstab("export", run, "-o", out)
    else:
        result = bstab(command, *FAST, "-o", out)
    assert_clean_failure(result, "--output", str(out), f"parent {blocker} is a file")
    assert blocker.read_bytes() == b"precious"


def test_output_that_is_a_directory_is_refused(tmp_path):
    result = bstab("record", *FAST, "-o", tmp_path)
    assert_clean_failure(result, "--output", "is a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only folder (a read-only tmpfs): root ignores permission bits, not this."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("command", ["record", "train", "export", "checkpoints"])
def test_read_only_output_folder_is_named_with_the_fix(command, read_only_dir, tmp_path):
    out = read_only_dir / "sub" / "x.h5"
    if command == "export":
        run = tmp_path / "run.h5"
        shutil.copy(REFERENCE, run)
        result = bstab("export", run, "-o", out)
    elif command == "checkpoints":
        torch.save({"w": torch.zeros(3, 4)}, tmp_path / "epoch_1.pt")
        result = bstab("record", "--from-checkpoints", tmp_path / "epoch_*.pt", "-o", out)
    else:
        result = bstab(command, *FAST, "-o", out)
    assert_clean_failure(result, "--output", str(out), "read-only", "choose a writable --output")
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["record", "train"])
def test_read_only_working_directory_with_the_default_output(command, read_only_dir, monkeypatch):
    monkeypatch.chdir(read_only_dir)
    result = bstab(command, *FAST)
    assert_clean_failure(result, "--output", "runs/", "read-only", "choose a writable --output")


def test_export_beside_a_run_in_a_read_only_folder(read_only_dir, tmp_path):
    run = read_only_dir / "run.h5"
    subprocess.run(["mount", "-o", "remount,rw", str(read_only_dir)], check=True)
    try:
        shutil.copy(REFERENCE, run)
    finally:
        subprocess.run(["mount", "-o", "remount,ro", str(read_only_dir)], check=True)
    result = bstab("export", run)
    assert_clean_failure(result, "--output", "read-only", "choose a writable --output")


def test_existing_output_is_refused_once_by_the_writer(tmp_path):
    # the CLI's own exists() check duplicated the writer's; the writer's message remains
    out = tmp_path / "taken.h5"
    out.write_bytes(b"keep me")
    for command in ("record", "train"):
        result = bstab(command, *FAST, "-o", out)
        text = assert_clean_failure(result, "already exists", "--force")
        assert text.count("already exists") == 1
    assert out.read_bytes() == b"keep me"


# ------------------------------------------------------------------ default names
def test_default_name_skips_a_name_another_process_is_creating(tmp_path, monkeypatch):
    # another writer holds the lock of runs/mlp-digits-seed0.h5 and has not linked it yet:
    # this used to fail "is writing it" instead of taking the next name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with WriterLock.acquire(tmp_path / "runs" / "mlp-digits-seed0.h5"):
        result = bstab("record", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "mlp-digits-seed0-2.h5").is_file()
    assert not (tmp_path / "runs" / "mlp-digits-seed0.h5").exists()


def test_default_name_that_appears_while_being_created_takes_the_next(tmp_path):
    # another process links runs/x.h5 between our free-name check and our creation
    from basis_stability.jobs import at_free_path
    from basis_stability.recording import Recorder

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tried = []

    def create(path: Path) -> Recorder:
        tried.append(path.name)
        if len(tried) == 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"the other process's run")
        return Recorder(model, path)

    with at_free_path("x", create, folder=tmp_path / "runs") as rec:
        assert rec.path == tmp_path / "runs" / "x-2.h5"
    assert tried == ["x.h5", "x-2.h5"]
    assert (tmp_path / "runs" / "x.h5").read_bytes() == b"the other process's run"


def test_step_schedule_leaves_no_batch_loss_to_drop_at_close(tmp_path, recwarn):
    out = tmp_path / "x.h5"
    result = bstab("record", *FAST, "--schedule", "every:5", "-o", out)
    assert result.exit_code == 0, result.output
    assert not [w for w in recwarn if "drops the metrics" in str(w.message)]
    with open_run(out) as run:
        assert "batch_loss" in run.metric_names


def test_two_concurrent_records_on_the_default_path_take_two_names(tmp_path):
    cmd = [sys.executable, "-m", "basis_stability", "record", "--model", "mlp", "--epochs", "2"]
    cmd += ["--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    names = sorted(p.name for p in (tmp_path / "runs").glob("*.h5"))
    assert names == ["mlp-digits-seed0-2.h5", "mlp-digits-seed0.h5"], outputs
    for name in names:
        with open_run(tmp_path / "runs" / name) as run:
            assert run.n_snapshots == 3


# ------------------------------------------------------------------ plan.json
def _valid_plan() -> dict:
    return {
        "model_class": "Sequential",
        "layers": {"0": [64, 128], "3": [128, 10]},
        "delay_snapshot": 2,
        "delay_epoch": 2.0,
        "delay_step": 24,
        "interval_snapshots": 1,
        "interval_epochs": 1.0,
        "interval_steps": 12,
        "beta": 0.2,
        "ranks": {"0": 20, "3": 8},
        "expected_trainable_share": 0.1,
        "rules": {},
        "evidence": {},
        "notes": [],
        "version": 1,
    }


def test_a_valid_plan_loads(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_valid_plan()))
    assert Plan.from_json(path).beta == 0.2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", "0.5"),  # a string: was accepted
        ("beta", 1.5),
        ("beta", True),
        ("delay_epoch", float("nan")),  # json.loads reads NaN
        ("delay_epoch", -1.0),
        ("delay_step", 2.5),
        ("interval_steps", 0),  # was silently replaced by the default
        ("interval_epochs", 0),
        ("interval_snapshots", 0),
        ("ranks", {"0": -1}),
        ("ranks", {"0": "20"}),
        ("ranks", {"0": 1.5}),
        ("ranks", {"0": 1000}),  # more than min(m, n)
        ("ranks", {"nope": 3}),
        ("ranks", [1, 2]),
        ("layers", {"0": [64]}),
        ("notes", "text"),
        ("version", True),
    ],
)
def test_plan_field_of_the_wrong_type_or_range_is_named(field, value, tmp_path):
    data = _valid_plan()
    data[field] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "x.h5"
    result = bstab("train", *FAST, "--plan", path, "-o", out)
    name = "plan version" if field == "version" else field
    shown = "nan" if field == "delay_epoch" and value != value else repr(value)
    assert_clean_failure(result, f"Expected `{name}`", shown)
    assert not out.exists()


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"plan"', b"\x00\xff binary"])
def test_plan_that_is_not_a_json_object_is_refused(content, tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    out = tmp_path / "x.h5"
    result = bstab("train", *FAST, "--plan", path, "-o", out)
    assert_clean_failure(result, "plan", str(path))
    assert not out.exists()


# ------------------------------------------------------------------ validate
def test_validate_a_directory_says_it_is_a_directory(tmp_path):
    result = bstab("validate", tmp_path)
    text = assert_clean_failure(result, "is a directory", "run file")
    assert "no such file" not in text


def test_validate_a_missing_file_says_so(tmp_path):
    text = assert_clean_failure(bstab("validate", tmp_path / "none.h5"), "no such file")
    assert "directory" not in text
