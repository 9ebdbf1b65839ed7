"""`bstab export` / export_snapshot: one recorded snapshot as a state-dict file, bit for bit.

Two oracles that do not use the package's reader: the raw HDF5 bytes read with plain h5py and
un-talled with plain numpy, and the model's own parameters at the time they were recorded.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers.cli import bstab
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import basis_stability
from basis_stability.errors import ConfigError, NoEligibleLayersError, RunExistsError
from basis_stability.exporting import export_snapshot
from basis_stability.recording import Recorder
from basis_stability.store import format as fmt

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
N_SNAPSHOTS = 3


class Tiny(nn.Module):
    """Every orientation of the tall view: conv and head are stored transposed, up is not."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # (4, 3, 3, 3) -> (27, 4)
        self.attn = nn.MultiheadAttention(8, 2)  # attn.in_proj_weight (24, 8), out_proj (8, 8)
        self.up = nn.Linear(16, 24)  # (24, 16), not transposed
        self.head = nn.Linear(24, 3)  # (3, 24) -> (24, 3), transposed


RECORDED = {  # layer name -> parameter name
    "features.0": "features.0.weight",
    "attn.in_proj": "attn.in_proj_weight",
    "attn.out_proj": "attn.out_proj.weight",
    "up": "up.weight",
    "head": "head.weight",
}
BIASES = [  # stored with every snapshot since format 1.3, in their own dtype (float32)
    "features.0.bias",
    "attn.in_proj_bias",
    "attn.out_proj.bias",
    "up.bias",
    "head.bias",
]


def _record(path: Path, dtype: str = "float32") -> list[dict[str, torch.Tensor]]:
    """Record N_SNAPSHOTS snapshots of a Tiny whose weights move between them; return copies of
    its state dict at each snapshot."""
    torch.manual_seed(0)
    model = Tiny()
    copies = []
    with Recorder(model, path, dtype=dtype) as rec:  # snapshot 0: the initial weights
        copies.append({k: v.clone() for k, v in model.state_dict().items()})
        for t in range(1, N_SNAPSHOTS):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            rec.snapshot(step=10 * t, epoch=t / 2)
            copies.append({k: v.clone() for k, v in model.state_dict().items()})
    return copies


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict[str, torch.Tensor]]]]:
    """One recorded run per storage dtype (read-only; tests write their exports elsewhere)."""
    folder = tmp_path_factory.mktemp("runs")
    return {
        dtype: (folder / f"{dtype}.h5", _record(folder / f"{dtype}.h5", dtype))
        for dtype in TORCH_DTYPES
    }


@pytest.fixture
def run32(runs, tmp_path: Path) -> Path:
    """A float32 run in its own folder (so default outputs land in tmp_path)."""
    path = tmp_path / "run.h5"
    path.write_bytes(runs["float32"][0].read_bytes())
    return path


def _oracle(run: Path, name: str, t: int) -> np.ndarray:
    """The stored values of layer ``name`` at snapshot ``t`` in the parameter's own shape, from
    plain h5py and numpy."""
    with h5py.File(run, "r") as f:
        ds = f["layers"][name]
        raw = ds[t]
        transposed = bool(ds.attrs["transposed"])
        orig_shape = tuple(int(d) for d in ds.attrs["orig_shape"])
    if transposed:
        raw = raw.T
    return np.ascontiguousarray(raw).reshape(orig_shape)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_every_snapshot_is_bit_exact_with_the_file_and_the_model(runs, tmp_path, dtype, suffix):
    run, copies = runs[dtype]
    for t in range(N_SNAPSHOTS):
        out = export_snapshot(run, tmp_path / f"s{t}{suffix}", snapshot=t)
        assert out == tmp_path / f"s{t}{suffix}"
        state = _load(out)
        assert sorted(state) == sorted(copies[t])  # the model's complete state dict
        for key in BIASES:  # exactly the model's, whatever the storage dtype of the matrices
            assert state[key].dtype == torch.float32
            assert _bytes(state[key]) == _bytes(copies[t][key]), (key, t)
        for name, key in RECORDED.items():
            got, want = state[key], _oracle(run, name, t)
            assert got.dtype == TORCH_DTYPES[dtype]
            assert tuple(got.shape) == want.shape == tuple(copies[t][key].shape)
            assert _bytes(got) == want.tobytes(), (name, t)
            # the model's own parameter at that time, converted to the storage dtype by torch
            assert _bytes(got) == _bytes(copies[t][key].to(TORCH_DTYPES[dtype])), (name, t)
    weights = [copies[t]["head.weight"] for t in range(N_SNAPSHOTS)]
    assert not torch.equal(weights[0], weights[-1])  # the snapshots differ


@pytest.mark.parametrize(
    ("dtype", "bits"),
    [
        # signalling NaN with payload, quiet NaN with payload, -0.0, smallest subnormal, -inf
        ("bfloat16", [0x7F81, 0xFFC1, 0x8000, 0x0001, 0xFF80]),
        ("float16", [0x7C01, 0xFE01, 0x8000, 0x0001, 0xFC00]),
    ],
)
def test_half_precision_bit_patterns_survive_export(runs, tmp_path, dtype, bits):
    """Values that a round trip through float32 would change (NaN payloads) stay as stored."""
    run = tmp_path / "run.h5"
    run.write_bytes(runs[dtype][0].read_bytes())
    with h5py.File(run, "r+") as f:
        ds = f["layers/head"]
        row = ds[1]
        row[: len(bits), 0] = np.array(bits, dtype=np.uint16).view(ds.dtype)
        ds[1] = row
    for suffix in (".safetensors", ".pt"):
        state = _load(export_snapshot(run, tmp_path / f"out{suffix}", snapshot=1))
        head = state["head.weight"]  # stored transposed: tall column 0 is the weight's row 0
        assert _bytes(head) == _oracle(run, "head", 1).tobytes()
        got = head[0, : len(bits)].contiguous().view(torch.int16).numpy().view(np.uint16)
        assert got.tolist() == bits


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float32_upcast_equals_the_exact_decode(runs, tmp_path, dtype):
    run, copies = runs[dtype]
    state = _load(export_snapshot(run, tmp_path / "up.safetensors", snapshot=2, dtype="float32"))
    for name, key in RECORDED.items():
        raw = _oracle(run, name, 2)
        if dtype == "bfloat16":
            want = (raw.astype(np.uint32) << 16).view(np.float32)  # plain numpy widening
        else:
            want = raw.astype(np.float32)
        assert state[key].dtype == torch.float32
        np.testing.assert_array_equal(state[key].numpy(), want)
        np.testing.assert_array_equal(state[key].numpy(), fmt.decode(raw, dtype))
        torch.testing.assert_close(
            state[key], copies[2][key].to(TORCH_DTYPES[dtype]).float(), rtol=0, atol=0
        )


def test_float32_option_on_a_float32_run_is_the_stored_data(run32, tmp_path):
    a = _load(export_snapshot(run32, tmp_path / "a.safetensors", dtype="float32"))
    b = _load(export_snapshot(run32, tmp_path / "b.safetensors", dtype="stored"))
    assert {k: _bytes(v) for k, v in a.items()} == {k: _bytes(v) for k, v in b.items()}


def test_safetensors_metadata_says_where_the_weights_come_from(runs, tmp_path):
    run, _ = runs["bfloat16"]
    out = export_snapshot(run, tmp_path / "m.safetensors", snapshot=-2)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "basis_stability.snapshot"
    assert meta["basis_stability_version"] == basis_stability.__version__
    assert meta["run"] == str(run)
    assert (meta["snapshot"], meta["step"], meta["epoch"]) == ("1", "10", "0.5")
    assert meta["storage_dtype"] == meta["dtype"] == "bfloat16"
    assert all(isinstance(v, str) for v in meta.values())


def test_negative_snapshot_counts_from_the_end_and_names_the_default_output(run32, tmp_path):
    last = export_snapshot(run32)
    assert last == tmp_path / "run-snapshot2.safetensors"
    first = export_snapshot(run32, snapshot=-N_SNAPSHOTS)
    assert first == tmp_path / "run-snapshot0.safetensors"
    explicit = _load(export_snapshot(run32, tmp_path / "two.safetensors", snapshot=2))
    assert {k: _bytes(v) for k, v in _load(last).items()} == {
        k: _bytes(v) for k, v in explicit.items()
    }
    assert _bytes(_load(first)["up.weight"]) == _oracle(run32, "up", 0).tobytes()
    pt = export_snapshot(run32, format="pt")
    assert pt == tmp_path / "run-snapshot2.pt"
    torch.load(pt, weights_only=True)


@pytest.mark.parametrize("snapshot", [N_SNAPSHOTS, -N_SNAPSHOTS - 1, 100])
def test_out_of_range_snapshot_names_the_range_and_writes_nothing(run32, tmp_path, snapshot):
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"-3\.\.2 \(3 snapshots\)"):
        export_snapshot(run32, tmp_path / "x.safetensors", snapshot=snapshot)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("snapshot", ["1", 1.0, True])
def test_non_integer_snapshot_is_refused(run32, tmp_path, snapshot):
    with pytest.raises(ConfigError, match="`snapshot` to be an integer"):
        export_snapshot(run32, tmp_path / "x.safetensors", snapshot=snapshot)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_existing_output_is_refused_without_force_and_left_untouched(run32, tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"keep me")
    with pytest.raises(RunExistsError, match="force") as info:
        export_snapshot(run32, out)
    assert str(out) in str(info.value)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.h5", out.name])  # no temp
    assert export_snapshot(run32, out, force=True) == out
    assert _bytes(_load(out)["head.weight"]) == _oracle(run32, "head", -1).tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.h5", out.name])


def test_the_run_itself_is_never_an_output(run32, tmp_path):
    before = run32.read_bytes()
    for target in (run32, tmp_path / "." / "run.h5"):
        with pytest.raises(ConfigError, match="other than the run"):
            export_snapshot(run32, target, format="pt", force=True)
    assert run32.read_bytes() == before


def test_a_directory_is_not_an_output(run32, tmp_path):
    folder = tmp_path / "dir.pt"
    folder.mkdir()
    with pytest.raises(ConfigError, match="a directory"):
        export_snapshot(run32, folder, force=True)


def test_layers_globs_restrict_the_export(run32, tmp_path):
    # a layer brings the biases of its own module (attn.in_proj: attn's in_proj_bias)
    state = _load(export_snapshot(run32, tmp_path / "a.pt", layers=["features.*", "attn.*"]))
    assert sorted(state) == [
        "attn.in_proj_bias",
        "attn.in_proj_weight",
        "attn.out_proj.bias",
        "attn.out_proj.weight",
        "features.0.bias",
        "features.0.weight",
    ]
    state = _load(export_snapshot(run32, tmp_path / "b.pt", layers="head"))
    assert list(state) == ["head.weight", "head.bias"]
    with pytest.raises(NoEligibleLayersError, match="features.0, attn.in_proj") as info:
        export_snapshot(run32, tmp_path / "c.pt", layers=["up", "nope*"])
    assert "'nope*'" in str(info.value)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("x.pt", {"format": "safetensors"}, "`format` to be pt for an output ending in .pt"),
        ("x.safetensors", {"format": "pt"}, "`format` to be safetensors"),
        ("x.bin", {}, "a file ending in .safetensors or .pt"),
        ("x.pt", {"format": "npz"}, "`format` to be one of safetensors, pt"),
        ("x.pt", {"dtype": "bfloat16"}, "`dtype` to be one of stored, float32"),
    ],
)
def test_bad_format_dtype_or_suffix_is_a_config_error(run32, tmp_path, name, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        export_snapshot(run32, tmp_path / name, **kwargs)
    assert not (tmp_path / name).exists()


def test_an_unknown_suffix_with_an_explicit_format_is_written_in_that_format(run32, tmp_path):
    out = export_snapshot(run32, tmp_path / "weights.bin", format="pt")
    assert _bytes(torch.load(out, weights_only=True)["up.weight"]) == (
        _oracle(run32, "up", -1).tobytes()
    )


def test_the_export_loads_into_a_fresh_model(runs, tmp_path):
    run, copies = runs["float32"]
    state = load_file(export_snapshot(run, tmp_path / "s.safetensors", snapshot=1))
    torch.manual_seed(123)
    fresh = Tiny()
    assert not torch.equal(fresh.up.weight, copies[1]["up.weight"])
    fresh.load_state_dict(state, strict=True)  # the complete state dict (format 1.3)
    loaded = fresh.state_dict()
    for key in [*RECORDED.values(), *BIASES]:
        assert torch.equal(loaded[key], copies[1][key])
        assert torch.equal(loaded[key], state[key])


# ---------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_file_and_prints_one_line(run32, tmp_path):
    out = tmp_path / "e1.safetensors"
    result = bstab("export", run32, "--snapshot", 1, "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Wrote {out}: snapshot 1 (epoch 0.5, step 10), 10 tensors, ")
    assert lines[0].endswith("KiB")
    assert _bytes(load_file(out)["features.0.weight"]) == _oracle(run32, "features.0", 1).tobytes()


def test_cli_defaults_layers_dtype_and_format(runs, tmp_path):
    run = tmp_path / "bf.h5"
    run.write_bytes(runs["bfloat16"][0].read_bytes())
    result = bstab(
        "export", run, "-s", "-1", "--layers", "up", "--layers", "hea*", "--format", "pt"
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "bf-snapshot2.pt"
    assert f"Wrote {out}: snapshot 2 (epoch 1, step 20), 4 tensors" in result.output
    assert "Missing 6 of the model's state-dict keys (not recorded): features.0.weight," in (
        " ".join(result.output.split())
    )  # a subset export is partial by design, and says so
    state = torch.load(out, weights_only=True)
    assert sorted(state) == ["head.bias", "head.weight", "up.bias", "up.weight"]
    assert state["up.weight"].dtype == torch.bfloat16
    result = bstab("export", run, "--dtype", "float32", "-o", tmp_path / "f.safetensors")
    assert result.exit_code == 0, result.output
    assert load_file(tmp_path / "f.safetensors")["up.weight"].dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--snapshot", "7"],
            "Expected `--snapshot` to be in the range -3..2 (3 snapshots) but got 7",
        ),
        (["-o", "x.pt", "--format", "safetensors"], "`--format` to be pt"),
        (["--layers", "nope"], "`--layers` to be globs matching"),
    ],
)
def test_cli_bad_input_is_one_line_and_a_non_zero_exit(run32, tmp_path, args, fragment):
    args = [str(tmp_path / a) if a.endswith(".pt") else a for a in args]
    result = bstab("export", run32, *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert fragment in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_cli_refuses_an_existing_output_without_force(run32, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    result = bstab("export", run32, "-o", out)
    assert result.exit_code != 0 and "--force" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == b"old"
    result = bstab("export", run32, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert len(load_file(out)) == len(RECORDED) + len(BIASES)


def test_cli_missing_run_is_a_clean_failure(tmp_path):
    result = bstab("export", tmp_path / "missing.h5")
    assert result.exit_code != 0
    assert "No run file" in result.output and "Traceback" not in result.output
