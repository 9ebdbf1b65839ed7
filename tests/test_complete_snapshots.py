"""Complete snapshots (format 1.3): biases, norm weights and buffers are recorded with the matrices,
so an exported snapshot rebuilds the recorded model exactly.

The oracles do not use the package's reader: the outputs the recorded model itself gave at each
snapshot (captured during recording), its own ``state_dict()`` copied then, counters kept by the
test (``num_batches_tracked``), key lists written out by hand, and plain h5py for the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_failure, bstab
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from basis_stability import Recorder, open_run
from basis_stability.errors import ConfigError, DamagedRunError, RunMismatchError
from basis_stability.exporting import export_snapshot
from basis_stability.store.validate import validate_run

HELPERS = Path(__file__).with_name("helpers")
sys.path.insert(0, str(HELPERS))
from crash_trial import Writer, check_snapshots, read_counts  # noqa: E402

SPEC_DIR = Path(__file__).resolve().parents[1] / "checkpoints_spec"
N_SNAPSHOTS = 4


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.LayerNorm(10),
    )


class Trace:
    """What the recorded model gave at each snapshot: eval outputs on a fixed probe batch and a
    copy of its state dict; and how many training forward passes it made."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.states: list[dict[str, torch.Tensor]] = []
        self.forwards = 0


def record(path: Path, make, seed: int = 0, **config) -> tuple[Trace, torch.Tensor]:
    """Record ``N_SNAPSHOTS`` snapshots of a digits-sized model trained on random data, a few
    SGD steps (momentum, weight decay) between snapshots."""
    torch.manual_seed(seed)
    model = make()
    gen = torch.Generator().manual_seed(seed + 1)
    probe = torch.randn(16, 1, 8, 8, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    trace = Trace()

    def capture() -> None:
        model.eval()
        with torch.no_grad():
            trace.outputs.append(model(probe).clone())
        model.train()
        trace.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    with Recorder(model, path, mode="overwrite", **config) as rec:
        capture()  # snapshot 0: the initial weights
        for t in range(1, N_SNAPSHOTS):
            for _ in range(3):
                x = torch.randn(32, 1, 8, 8, generator=gen)
                y = torch.randint(0, 10, (32,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                trace.forwards += 1
                opt.zero_grad()
                loss.backward()
                opt.step()
            rec.snapshot(step=3 * t, epoch=t)
            capture()
    return trace, probe


def rebuild(export: Path, make, seed: int = 123) -> nn.Module:
    torch.manual_seed(seed)  # other initial weights than the recorded model's
    fresh = make()
    state = load_file(export) if export.suffix == ".safetensors" else torch.load(export)
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn-batchnorm"])
def test_an_exported_snapshot_rebuilds_the_recorded_model_exactly(tmp_path, make, suffix):
    trace, probe = record(tmp_path / "run.h5", make)
    assert not torch.equal(trace.outputs[0], trace.outputs[-1])  # training moved the model
    for t in range(N_SNAPSHOTS):
        out = export_snapshot(tmp_path / "run.h5", tmp_path / f"s{t}{suffix}", snapshot=t)
        exported = load_file(out) if suffix == ".safetensors" else torch.load(out)
        if suffix == ".pt":  # safetensors orders its tensors by itself
            assert list(exported) == list(trace.states[t])  # every key, in state-dict order
        assert sorted(exported) == sorted(trace.states[t])
        for key, value in exported.items():  # own shapes (0-D counters too) and dtypes
            want = trace.states[t][key]
            assert (value.shape, value.dtype) == (want.shape, want.dtype), key
        fresh = rebuild(out, make)
        with torch.no_grad():
            assert torch.equal(fresh(probe), trace.outputs[t]), f"snapshot {t}"
        for key, value in fresh.state_dict().items():
            assert value.dtype == trace.states[t][key].dtype, key
            assert torch.equal(value, trace.states[t][key]), (key, t)


def test_batchnorm_statistics_and_counter_are_stored_exactly(tmp_path):
    trace, _ = record(tmp_path / "run.h5", cnn)
    with open_run(tmp_path / "run.h5") as run:
        assert run.state_keys == [
            "0.bias",
            "1.weight",
            "1.bias",
            "1.running_mean",
            "1.running_var",
            "1.num_batches_tracked",
            "3.bias",
            "4.weight",
            "4.bias",
            "4.running_mean",
            "4.running_var",
            "4.num_batches_tracked",
            "7.bias",
            "8.weight",
            "8.bias",
        ]
        for t in range(N_SNAPSHOTS):
            state = run.state(t)
            for key in ("1.num_batches_tracked", "4.num_batches_tracked"):
                assert state[key].dtype == np.int64 and state[key].shape == ()
                assert int(state[key]) == 3 * t  # the test's own count of training passes
            mean = trace.states[t]["1.running_mean"].numpy()
            np.testing.assert_array_equal(state["1.running_mean"], mean)
        assert not np.array_equal(run.state(0)["4.running_var"], run.state(3)["4.running_var"])
    assert trace.forwards == 3 * (N_SNAPSHOTS - 1)
    with h5py.File(tmp_path / "run.h5", "r") as f:  # plain h5py: one int64 row of two counters
        assert f["state/int64"].dtype == np.int64
        np.testing.assert_array_equal(f["state/int64"][N_SNAPSHOTS - 1], [9, 9])
        assert f["state/float32"].fletcher32 and f["state/float32"].chunks[0] == 1


def test_recording_without_biases_stores_no_state_and_the_export_names_what_is_missing(tmp_path):
    run = tmp_path / "run.h5"
    trace, _ = record(run, mlp, biases=False)
    with open_run(run) as r:
        assert r.state_keys == [] and r.state(1) == {}
        assert [k.key for k in r.model_keys] == [
            "1.weight",
            "1.bias",
            "3.weight",
            "3.bias",
            "5.weight",
            "5.bias",
        ]
        assert json.loads(r.attrs["config"])["biases"] is False
    with h5py.File(run, "r") as f:
        assert list(f["state"]) == ["index"]  # the model's keys, no values
    out = tmp_path / "s.safetensors"
    result = bstab("export", run, "-s", 2, "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and "6 tensors" not in lines[0] and "3 tensors" in lines[0]
    assert lines[1].startswith(
        "Missing 3 of the model's state-dict keys (not recorded): 1.bias, 3.bias, 5.bias;"
    )
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["missing_keys"]) == ["1.bias", "3.bias", "5.bias"]
    assert meta["complete"] == "false"
    torch.manual_seed(5)
    fresh = mlp()
    loaded = fresh.load_state_dict(load_file(out), strict=False)
    assert sorted(loaded.missing_keys) == ["1.bias", "3.bias", "5.bias"]
    assert torch.equal(fresh.state_dict()["3.weight"], trace.states[2]["3.weight"])


def test_a_complete_export_says_so_in_its_metadata_and_prints_one_line(tmp_path):
    record(tmp_path / "run.h5", cnn)
    out = tmp_path / "s.safetensors"
    result = bstab("export", tmp_path / "run.h5", "-o", out)
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "18 tensors" in result.output  # 3 weights + 15 state entries
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["complete"] == "true"
        assert json.loads(f.metadata()["missing_keys"]) == []


def test_bstab_record_no_biases_flag(tmp_path):
    out = tmp_path / "r.h5"
    result = bstab(
        "record", "--model", "mlp", "--epochs", "1", "--no-biases", "--no-progress", "-o", out
    )
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        assert run.state_keys == []
        assert {k.key for k in run.model_keys} - {i.param_name for i in run.layers} == {
            "fc1.bias",
            "fc2.bias",
            "head.bias",
        }
    result = bstab(
        "record", "--model", "mlp", "--epochs", "1", "--no-progress", "-o", out, "--force"
    )
    assert result.exit_code == 0, result.output
    with open_run(out) as run:
        assert run.state_keys == ["fc1.bias", "fc2.bias", "head.bias"]


class Tied(nn.Module):
    """A head tied to its embedding, a LayerNorm, and an unselected >= 2-D positional table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.pos = nn.Parameter(torch.randn(5, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids) + self.pos[: ids.shape[1]]))


def test_tied_keys_are_exported_under_both_names_and_unrecorded_tables_are_named(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ids = torch.randint(0, 12, (3, 5))
    with Recorder(model, tmp_path / "run.h5", types=["embedding"]) as rec:
        with torch.no_grad():
            model.norm.weight.mul_(1.5)
            model.emb.weight.add_(0.1)
        rec.snapshot(step=1)
        want = model(ids).detach()
    with open_run(tmp_path / "run.h5") as run:
        assert run.state_keys == ["norm.weight", "norm.bias"]  # pos is 2-D: not small state
        assert dict(run.state_index.tied) == {"head.weight": "emb.weight"}
    out = tmp_path / "s.pt"
    result = bstab("export", tmp_path / "run.h5", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Missing 1 of the model's state-dict keys (not recorded): pos;" in result.output
    state = torch.load(out)
    assert list(state) == ["emb.weight", "norm.weight", "norm.bias", "head.weight"]
    assert torch.equal(state["head.weight"], state["emb.weight"])
    torch.manual_seed(9)
    fresh = Tied()
    fresh.load_state_dict({**state, "pos": model.pos.detach()}, strict=True)
    assert fresh.head.weight is fresh.emb.weight  # still tied after loading
    assert torch.equal(fresh(ids), want)


def test_layers_subset_brings_its_own_biases_and_lists_the_rest(tmp_path):
    record(tmp_path / "run.h5", cnn)
    out = tmp_path / "s.safetensors"
    result = bstab("export", tmp_path / "run.h5", "--layers", "7", "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(load_file(out)) == ["7.bias", "7.weight"]
    with safe_open(out, framework="pt") as f:
        missing = json.loads(f.metadata()["missing_keys"])
    assert len(missing) == 18 - 2 and missing[:3] == ["0.weight", "0.bias", "1.weight"]


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_biases_are_exact_whatever_the_storage_dtype_of_the_matrices(tmp_path, storage):
    trace, _ = record(tmp_path / "run.h5", cnn, dtype=storage)
    state = load_file(export_snapshot(tmp_path / "run.h5", tmp_path / "s.safetensors"))
    assert state["0.weight"].dtype == getattr(torch, storage)
    for key in ("0.bias", "1.running_var", "8.weight"):
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], trace.states[-1][key]), key
    assert torch.equal(state["1.num_batches_tracked"], trace.states[-1]["1.num_batches_tracked"])


def test_a_bfloat16_model_stores_its_biases_as_bfloat16_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([1e-3, -2.5, 3.140625, -0.0]))
    with Recorder(model, tmp_path / "run.h5", dtype="bfloat16"):
        pass
    with open_run(tmp_path / "run.h5") as run:
        assert [e.dtype for e in run.state_index.entries] == ["bfloat16"] * 3
        np.testing.assert_array_equal(
            run.state(0)["1.bias"], model[1].bias.detach().float().numpy()
        )
    for dtype, torch_dtype in (("stored", torch.bfloat16), ("float32", torch.float32)):
        out = export_snapshot(tmp_path / "run.h5", tmp_path / f"{dtype}.pt", dtype=dtype)
        got = torch.load(out)["1.bias"]
        assert got.dtype == torch_dtype
        assert torch.equal(got, model[1].bias.detach().to(torch_dtype))


# ----------------------------------------------------------------------- resume and roll back
def test_resume_with_other_biases_is_a_mismatch(tmp_path):
    path = tmp_path / "run.h5"
    record(path, mlp)
    torch.manual_seed(0)
    changed = mlp()
    changed[3].bias = nn.Parameter(torch.zeros(1))  # same matrices, a bias of another shape
    with pytest.raises(
        RunMismatchError, match=r"3\.bias was float32 \(16,\) and is now float32 \(1,\)"
    ):
        Recorder(changed, path, mode="append")
    torch.manual_seed(0)
    no_bias = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    with pytest.raises(RunMismatchError, match="in the run but not in the model: 1.bias"):
        Recorder(no_bias, path, mode="append")
    with open_run(path) as run:
        assert run.n_snapshots == N_SNAPSHOTS  # nothing was written


def test_resume_and_roll_back_keep_state_rows_with_their_snapshots(tmp_path):
    path = tmp_path / "run.h5"
    trace, _ = record(path, mlp)
    torch.manual_seed(0)
    model = mlp()
    model.load_state_dict(trace.states[1])
    with Recorder(model, path, mode="append", keep=2, biases=False) as rec:  # the run decides
        with torch.no_grad():
            model[5].bias.fill_(7.0)
        rec.snapshot(step=4)
    with open_run(path) as run:
        assert run.n_snapshots == 3
        for t in range(2):
            for key, value in run.state(t).items():
                np.testing.assert_array_equal(value, trace.states[t][key].numpy())
        np.testing.assert_array_equal(run.state(2)["5.bias"], np.full(10, 7.0, np.float32))
        np.testing.assert_array_equal(run.state(2)["1.bias"], trace.states[1]["1.bias"].numpy())
    assert validate_run(path).ok


def test_appending_to_a_run_without_state_records_the_matrices_only(tmp_path, caplog):
    path = tmp_path / "run.h5"
    record(path, mlp, biases=False)
    torch.manual_seed(0)
    with Recorder(mlp(), path, mode="append") as rec:
        rec.snapshot(step=99)
    assert "stores no biases or buffers" in caplog.text
    with open_run(path) as run:
        assert run.n_snapshots == N_SNAPSHOTS + 1 and run.state_keys == []


def test_a_model_that_changes_a_bias_dtype_mid_run_is_refused_before_commit(tmp_path):
    path = tmp_path / "run.h5"
    torch.manual_seed(0)
    model = mlp()
    with Recorder(model, path) as rec:
        model[1].bias.data = model[1].bias.data.double()
        with pytest.raises(ConfigError, match=r"`model\.1\.bias` to be a float32 tensor"):
            rec.snapshot(step=1)
    with open_run(path) as run:
        assert run.n_snapshots == 1


# ----------------------------------------------------------------------- crashes and damage
def test_sigkill_after_the_state_rows_before_the_commit_loses_nothing_committed(tmp_path):
    """Every row of snapshot 3 (layers and state) reached the disk, then SIGKILL: snapshot 3
    was not committed, 0..2 are exact with their biases, and resuming rewrites 3 whole."""
    path = tmp_path / "run.h5"
    writer = Writer(path, "--sizes", "32,24,16", "--die-before-commit", "3")
    try:
        writer.wait_for("ready")
        code = writer.finish()
    finally:
        writer.stop()
    assert code == -9, writer.output()
    committed, rows = read_counts(path)
    assert (committed, rows) == (3, 4)
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert f["state/float32"].shape[0] == 4  # the uncommitted state row is on disk
    check_snapshots(path, 3, "32,24,16")
    report = validate_run(path)
    assert report.ok, [str(f) for f in report.findings]
    assert ("info", "/state/float32") in [(f.level, f.where) for f in report.findings]
    resumed = Writer(
        path, "--sizes", "32,24,16", "--mode", "append", "--start", "3", "--count", "2"
    )
    try:
        assert resumed.wait_for("ready") == "ready 3"
        assert resumed.finish() == 0, resumed.output()
    finally:
        resumed.stop()
    check_snapshots(path, 5, "32,24,16")


@pytest.mark.parametrize(("where", "state_rows"), [("--die-inside", 2), ("--die-before-state", 2)])
def test_sigkill_before_the_state_rows_commits_nothing(tmp_path, where, state_rows):
    """Killed inside the layer rows, or after all of them and before the state rows."""
    path = tmp_path / "run.h5"
    writer = Writer(path, "--sizes", "32,24,16,8", where, "2")
    try:
        writer.wait_for("ready")
        assert writer.finish() == -9
    finally:
        writer.stop()
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert f["layers/0"].shape[0] == 3 and f["state/float32"].shape[0] == state_rows
        full = [f[f"layers/{i}"].shape[0] for i in range(3)]
    assert full == ([3, 3, 2] if where == "--die-inside" else [3, 3, 3])
    check_snapshots(path, 2, "32,24,16,8")
    assert validate_run(path).ok


def _chunk_offset(path: Path, dataset: str, t: int) -> int:
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        return ds.id.get_chunk_info_by_coord((t,) + (0,) * (ds.ndim - 1)).byte_offset


def test_a_damaged_state_chunk_is_an_error_for_the_reader_validate_and_export(tmp_path):
    path = tmp_path / "run.h5"
    record(path, cnn)
    offset = _chunk_offset(path, "state/float32", 2)
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with open_run(path) as run:
        np.testing.assert_array_equal(run.state(1)["0.bias"], run.state(1)["0.bias"])  # others ok
        with pytest.raises(DamagedRunError, match="state float32 snapshot 2 cannot be read"):
            run.state(2)
    report = validate_run(path)
    assert not report.ok
    errors = [f for f in report.findings if f.level == "error"]
    assert [f.where for f in errors] == ["/state/float32"]
    assert "snapshot 2 cannot be read" in errors[0].message and "checksum" in errors[0].message
    result = bstab("export", path, "-s", 2, "-o", tmp_path / "x.pt")
    assert_clean_failure(result, "state float32 snapshot 2 cannot be read")
    assert not (tmp_path / "x.pt").exists()
    assert bstab("export", path, "-s", 1, "-o", tmp_path / "y.pt").exit_code == 0


def test_a_state_row_never_written_is_an_error(tmp_path):
    path = tmp_path / "run.h5"
    record(path, mlp)
    with h5py.File(path, "r+", libver="latest") as f:  # a commit whose state row was never written
        n = len(f["snapshots"])
        for ds in f["layers"].values():
            ds.resize(n + 1, axis=0)
            ds[n] = ds[n - 1]
        f["state/float32"].resize(n + 1, axis=0)
        f["snapshots"].resize(n + 1, axis=0)
        f["snapshots"][n] = f["snapshots"][n - 1]
    with open_run(path) as run, pytest.raises(DamagedRunError, match="snapshot 4 has no data"):
        run.state(4)
    report = validate_run(path)
    assert [(f.where, f.message) for f in report.findings if f.level == "error"] == [
        ("/state/float32", "snapshot 4 has no data in the file (never written)")
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["state/float32"].attrs.__setitem__("dtype", b"float64"), "metadata_sha256"),
        (lambda f: f["state"].move("int64", "int32"), "metadata_sha256"),
        (lambda f: f.__delitem__("state"), "metadata_sha256"),
        (lambda f: f["state/int64"].resize(2, axis=0), "holds 2 rows for 4 snapshots"),
        (
            lambda f: f["state/index"].__setitem__(slice(0, 2), np.frombuffer(b"[]", np.uint8)),
            "`/state` is inconsistent",
        ),
    ],
    ids=["dtype-attr", "renamed", "deleted", "rows-short", "index-not-json"],
)
def test_damaged_state_metadata_is_a_clear_error(tmp_path, edit, message):
    path = tmp_path / "run.h5"
    record(path, cnn)
    with h5py.File(path, "r+", libver="latest") as f:
        edit(f)
    with pytest.raises(DamagedRunError, match=message), open_run(path) as run:
        run.state(0)
    assert not validate_run(path).ok
    result = bstab("export", path, "-o", tmp_path / "x.safetensors")
    assert_clean_failure(result)


def test_recovery_copies_the_state(tmp_path):
    from basis_stability.store import recover

    path = tmp_path / "run.h5"
    trace, _ = record(path, cnn)
    crash = "import h5py,os,sys; f=h5py.File(sys.argv[1],'r+',libver='latest'); "
    subprocess.run([sys.executable, "-c", crash + "f.swmr_mode=True; os._exit(0)", str(path)])
    assert recover(path) == N_SNAPSHOTS
    with open_run(path) as run:
        for t in range(N_SNAPSHOTS):
            for key, value in run.state(t).items():
                np.testing.assert_array_equal(value, trace.states[t][key].numpy(), err_msg=key)
    assert validate_run(path).ok


# ----------------------------------------------------------------------- older files
def test_an_export_of_a_format_1_2_run_says_it_cannot_tell_what_is_missing(tmp_path):
    run = tmp_path / "old.h5"
    shutil.copy(SPEC_DIR / "reference_v1.2.h5", run)
    out = tmp_path / "old.safetensors"
    result = bstab("export", run, "-o", out)
    assert result.exit_code == 0, result.output
    assert "does not list its model's state-dict keys" in " ".join(result.output.split())
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["complete"] == "unknown" and "missing_keys" not in f.metadata()
    assert sorted(load_file(out)) == ["attn.in_proj_weight", "conv.weight", "fc.weight"]


def test_inspect_says_what_a_snapshot_holds_besides_its_matrices(tmp_path):
    record(tmp_path / "all.h5", cnn)
    record(tmp_path / "none.h5", mlp, biases=False)
    lines = {}
    for name in ("all", "none"):
        result = bstab("inspect", tmp_path / f"{name}.h5", "--no-scan")
        assert result.exit_code == 0, result.output
        (lines[name],) = [ln for ln in result.output.splitlines() if ln.startswith("state")]
    assert lines["all"] == (
        "state      15 biases/buffers per snapshot (92 values): exports are complete state dicts"
    )
    assert lines["none"] == (
        "state      none (recorded with biases off): exports lack 3 of 6 state-dict keys: "
        "1.bias, 3.bias, 5.bias"
    )
    result = bstab("inspect", SPEC_DIR / "reference_v1.2.h5", "--no-scan")
    assert result.exit_code == 0 and "\nstate " not in result.output  # 1.2 does not say


def test_the_writer_refuses_a_snapshot_without_the_runs_state(tmp_path):
    from basis_stability.store import RunWriter
    from basis_stability.store import state as st
    from basis_stability.views import LayerView

    views = [LayerView.of("fc", "fc.weight", "linear", (3, 4))]
    index = st.plan([("fc.bias", "float32", (3,))])
    with RunWriter.create(tmp_path / "w.h5", views, model_class="M", state=index) as writer:
        mats = [np.ones((4, 3), np.float32)]
        with pytest.raises(ConfigError, match="state rows of snapshot 0"):
            writer.append(iter(mats))
        with pytest.raises(ConfigError, match="float32 \\(3,\\)"):
            writer.append(iter(mats), state={"fc.bias": np.ones(3, np.float64)})
        writer.append(iter(mats), state={"fc.bias": np.arange(3, dtype=np.float32)})
    with open_run(tmp_path / "w.h5") as run:
        assert run.n_snapshots == 1
        np.testing.assert_array_equal(run.state(0)["fc.bias"], [0, 1, 2])


def test_an_empty_buffer_is_recreated_by_the_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].register_buffer("mask", torch.zeros(0, dtype=torch.int32))
    with Recorder(model, tmp_path / "run.h5"):
        pass
    with open_run(tmp_path / "run.h5") as run:
        assert run.state_keys == ["0.bias"]  # nothing to store for the empty buffer
    state = torch.load(export_snapshot(tmp_path / "run.h5", tmp_path / "s.pt"))
    assert state["0.mask"].shape == (0,) and state["0.mask"].dtype == torch.int32
    nn.Sequential(nn.Linear(3, 2)).load_state_dict(
        {k: v for k, v in state.items() if k != "0.mask"}, strict=True
    )
