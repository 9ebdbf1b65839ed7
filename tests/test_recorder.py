"""The Recorder: what it writes, when, and that it copies one layer at a time."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import basis_stability.recording.recorder as recorder_mod
from basis_stability.errors import ConfigError, RunExistsError, RunFileError
from basis_stability.recording import Recorder, at, every
from basis_stability.store import open_run


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Oracle: plain numpy copies of the recorded weights, keyed by layer name."""
    return {
        "0": model[0].weight.detach().numpy().copy(),
        "2": model[2].weight.detach().numpy().copy(),
    }


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()


def _assert_stored(path: Path, copies: list[dict[str, np.ndarray]]) -> None:
    with open_run(path) as run:
        assert run.n_snapshots == len(copies)
        for t, want in enumerate(copies):
            for name, w in want.items():
                np.testing.assert_array_equal(run.layer(name).original(t), w)


def test_initial_and_explicit_snapshots_store_the_weights_of_their_time(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = [_weights(model)]
    with Recorder(model, path) as rec:
        assert [v.name for v in rec.views] == ["0", "2"]
        for epoch in (1, 2):
            _train_step(model, opt)
            copies.append(_weights(model))
            assert rec.snapshot(epoch=epoch, metrics={"loss": 1.0 / epoch}) == epoch
    assert not any(np.array_equal(copies[0]["0"], c["0"]) for c in copies[1:])  # weights moved
    _assert_stored(path, copies)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.layer("2")[1], copies[1]["2"].T)  # (8, 3) tall view
        np.testing.assert_array_equal(run.epochs, [0.0, 1.0, 2.0])
        np.testing.assert_array_equal(run.steps, [0, -1, -1])
        np.testing.assert_array_equal(run.metrics_array()[:, 0], [np.nan, 1.0, 0.5])
        assert run.model_class == "Sequential"


def test_with_block_closes_the_file(tmp_path: Path):
    path = tmp_path / "run.h5"
    with Recorder(_model(), path) as rec:
        pass
    assert not rec._writer._f.id.valid
    with h5py.File(path, "r+"):  # a still-open SWMR writer would make this fail
        pass


def test_initial_false_records_nothing_at_creation(tmp_path: Path):
    with Recorder(_model(), tmp_path / "run.h5", initial=False) as rec:
        assert rec.n_snapshots == 0


def test_attach_fires_on_schedule_with_steps_and_fractional_epochs(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = [_weights(model)]
    rec = Recorder(model, path).attach(opt, every(2), steps_per_epoch=4)
    for step in range(1, 8):
        _train_step(model, opt)
        if step % 2 == 0:
            copies.append(_weights(model))
    rec.close()
    _assert_stored(path, copies)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
        np.testing.assert_array_equal(run.epochs, [0.0, 0.5, 1.0, 1.5])


def test_log_and_metrics_fn_attach_to_the_next_snapshot_only(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    rec = Recorder(model, path).attach(opt, at([2, 3]), metrics_fn=lambda: {"n": len(calls)})
    rec.log(loss=torch.tensor(1.5))
    _train_step(model, opt)
    calls.append(1)
    _train_step(model, opt)  # snapshot at step 2 takes the logged loss
    calls.append(1)
    _train_step(model, opt)  # snapshot at step 3: the loss was used up
    rec.close()
    with open_run(path) as run:
        assert run.metric_names == ["loss", "n"]
        np.testing.assert_array_equal(
            run.metrics_array(), [[np.nan, np.nan], [1.5, 1.0], [np.nan, 2.0]]
        )
        assert all(math.isnan(e) for e in run.epochs[1:])  # no steps_per_epoch: unknown


def test_schedule_that_never_fires_warns_on_close(tmp_path: Path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, tmp_path / "run.h5").attach(opt, at([100]))
    for _ in range(3):
        _train_step(model, opt)
    with pytest.warns(RuntimeWarning, match="never fired"):
        rec.close()


def test_attach_rejects_a_non_schedule(tmp_path: Path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "run.h5") as rec, pytest.raises(ConfigError, match="schedule"):
        rec.attach(opt, 10)


def test_append_mode_resumes_and_continues_the_step_count(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = [_weights(model)]
    with Recorder(model, path).attach(opt, every(1)):
        for _ in range(3):
            _train_step(model, opt)
            copies.append(_weights(model))
    with Recorder(model, path, mode="append") as rec:
        assert (rec.step, rec.n_snapshots) == (3, 4)  # no new initial snapshot
        rec.attach(opt, every(1))
        for _ in range(2):
            _train_step(model, opt)
            copies.append(_weights(model))
    _assert_stored(path, copies)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0, 1, 2, 3, 4, 5])


def test_append_mode_creates_a_missing_file(tmp_path: Path):
    model = _model()
    with Recorder(model, tmp_path / "run.h5", mode="append") as rec:
        assert rec.n_snapshots == 1
    _assert_stored(tmp_path / "run.h5", [_weights(model)])


def test_create_mode_refuses_an_existing_file(tmp_path: Path):
    path = tmp_path / "run.h5"
    Recorder(_model(), path).close()
    before = path.read_bytes()
    with pytest.raises(RunExistsError):
        Recorder(_model(seed=1), path, mode="create")
    assert path.read_bytes() == before


def test_overwrite_mode_replaces_the_file(tmp_path: Path):
    path = tmp_path / "run.h5"
    Recorder(_model(), path).close()
    other = _model(seed=1)
    Recorder(other, path, mode="overwrite").close()
    _assert_stored(path, [_weights(other)])


@pytest.mark.parametrize("bad", [{"mode": "replace"}, {"dtype": "int8"}])
def test_bad_mode_or_dtype_raise_config_error(tmp_path: Path, bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        Recorder(_model(), tmp_path / "run.h5", **bad)
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_stores_the_rounded_weights(tmp_path: Path, dtype):
    model, path = _model(), tmp_path / "run.h5"
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([1e-6, 3.14159265])
    half = getattr(torch, dtype)
    want = {k: torch.from_numpy(w).to(half).float().numpy() for k, w in _weights(model).items()}
    assert not np.array_equal(want["0"], _weights(model)["0"])  # rounding did happen
    Recorder(model, path, dtype=dtype).close()
    _assert_stored(path, [want])


@pytest.mark.parametrize(
    ("first", "then"), [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float32")]
)
def test_append_with_another_dtype_keeps_the_runs_storage_dtype(tmp_path, caplog, first, then):
    # resuming a bfloat16 run with dtype="float32" used to store float values as raw uint16 bits
    model, path = _model(), tmp_path / "run.h5"
    Recorder(model, path, dtype=first).close()
    with Recorder(model, path, dtype=then, mode="append") as rec:
        rec.snapshot()
    assert f"appending in {first}, not {then}" in caplog.text
    half = getattr(torch, first)
    want = {k: torch.from_numpy(w).to(half).float().numpy() for k, w in _weights(model).items()}
    _assert_stored(path, [want, want])


def test_nan_weights_are_recorded_as_they_are(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    with torch.no_grad():
        model[2].weight[1, 5] = float("nan")
    Recorder(model, path).close()
    with open_run(path) as run:
        stored = run.layer("2")[0]  # (8, 3): the transpose of the (3, 8) weight
    assert np.isnan(stored).sum() == 1 and np.isnan(stored[5, 1])
    np.testing.assert_array_equal(stored, _weights(model)["2"].T)


def test_data_parallel_model_is_recorded_under_bare_names(tmp_path: Path):
    model, path = _model(), tmp_path / "run.h5"
    Recorder(nn.DataParallel(model), path).close()
    with open_run(path) as run:
        assert run.layer_names == ["0", "2"]
        assert [i.param_name for i in run.layers] == ["0.weight", "2.weight"]
    _assert_stored(path, [_weights(model)])


def test_layers_are_copied_one_at_a_time_without_state_dict(tmp_path: Path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_to_storage = recorder_mod.to_storage
    real_write = h5py.Dataset.write_direct

    def spy_to_storage(view, weight, dtype):
        events.append(("copy", view.name))
        return real_to_storage(view, weight, dtype)

    def spy_write(self, *args, **kwargs):
        events.append(("write", self.name.rsplit("/", 1)[-1]))
        return real_write(self, *args, **kwargs)

    real_state_dict = nn.Module.state_dict

    def no_state_dict(self, *args, keep_vars=False, **kwargs):
        # keep_vars=True lists the tensors themselves (no copy): the recorder reads the keys
        # of its biases and buffers from it once, at creation
        if not keep_vars:
            raise AssertionError("the recorder must not copy a whole state_dict")
        return real_state_dict(self, *args, keep_vars=True, **kwargs)

    monkeypatch.setattr(recorder_mod, "to_storage", spy_to_storage)
    monkeypatch.setattr(h5py.Dataset, "write_direct", spy_write)
    monkeypatch.setattr(nn.Module, "state_dict", no_state_dict)
    model = _model()
    # the synchronous path (the background one copies into its buffers: tests/test_background.py)
    with Recorder(model, tmp_path / "run.h5", background=False) as rec:
        rec.snapshot(epoch=1)
    # each copy is written before the next layer is copied; the two biases follow as one row
    one = [("copy", "0"), ("write", "0"), ("copy", "2"), ("write", "2"), ("write", "float32")]
    assert events == one * 2
    monkeypatch.undo()
    _assert_stored(tmp_path / "run.h5", [_weights(model)] * 2)


@pytest.mark.parametrize("step", [1.7, 2.0, True, np.float64(3.0), torch.tensor(1.5), -2, 2**63])
def test_snapshot_refuses_a_step_that_is_not_an_integer_step(tmp_path: Path, step):
    # 1.7 used to be stored as 1, True as 1, -2 as -2
    path = tmp_path / "run.h5"
    with Recorder(_model(), path) as rec:
        with pytest.raises(ConfigError, match="`step`"):
            rec.snapshot(step=step)
        assert rec.n_snapshots == 1  # the initial one only
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0])


def test_snapshot_takes_python_numpy_and_torch_integer_steps(tmp_path: Path):
    path = tmp_path / "run.h5"
    with Recorder(_model(), path) as rec:
        for step in (3, np.int64(5), torch.tensor(7), -1):
            rec.snapshot(step=step)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0, 3, 5, 7, -1])


def test_snapshot_after_close_says_the_recorder_is_closed(tmp_path: Path):
    # was: RuntimeError: identifier is not of specified type
    path = tmp_path / "run.h5"
    rec = Recorder(_model(), path)
    rec.close()
    for call in (lambda: rec.snapshot(epoch=1), lambda: rec.log(loss=1.0)):
        with pytest.raises(RunFileError, match=f"recorder for {path} is closed"):
            call()
    rec.close()  # twice is fine
    with open_run(path) as run:
        assert run.n_snapshots == 1


def test_metrics_logged_after_the_last_snapshot_warn_at_close(tmp_path: Path):
    rec = Recorder(_model(), tmp_path / "run.h5")
    rec.log(loss=0.5)
    rec.snapshot(epoch=1)  # takes loss
    rec.log(val_loss=0.4, acc=0.9)  # no snapshot follows
    with pytest.warns(RuntimeWarning, match="drops the metrics acc, val_loss"):
        rec.close()


def test_close_does_not_warn_when_every_logged_metric_was_stored(tmp_path: Path, recwarn):
    with Recorder(_model(), tmp_path / "run.h5") as rec:
        rec.log(loss=0.5)
        rec.snapshot(epoch=1)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
