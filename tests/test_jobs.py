"""The recipes behind ``bstab record`` and ``bstab train`` (jobs.py): epochs-or-steps parsing,
run names that never overwrite, the headline, and a recorded job whose snapshots are the
weights and losses of the same training replayed by hand.
(TrainJob -> OIALRConfig presets and overrides are in test_train_job.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import basis_stability as bs
from basis_stability import jobs
from basis_stability.errors import ConfigError, RunExistsError, RunFileError, RunLockedError
from basis_stability.jobs import (
    RecordJob,
    RecordResult,
    TrainJob,
    at_free_path,
    auto_mode,
    build,
    default_run_path,
    headline,
    oialr_config,
    parse_steps,
    run_record_job,
    run_train_job,
)
from basis_stability.training.loop import TrainConfig, check_seed, fit, make_optimizer
from basis_stability.zoo import build_model

TINY = TrainConfig(epochs=2, batch_size=512)  # 1438 digits: 3 steps per epoch


# ---------------------------------------------------------------------- epochs or steps
@pytest.mark.parametrize(
    ("text", "per_epoch", "steps"),
    [
        ("2.5", 10, 25),  # the docstring's examples
        ("7steps", 10, 7),
        ("7step", 10, 7),
        (" 250STEPS ", 3, 250),
        ("0", 10, 0),
        ("3", 23, 69),
        ("0.5", 23, 12),  # 11.5 rounds to the even 12
        (None, 10, None),
    ],
)
def test_parse_steps_reads_epochs_or_steps(text, per_epoch: int, steps):
    assert parse_steps(text, "--delay", per_epoch) == steps


@pytest.mark.parametrize("text", ["abc", "", "inf", "nan", "-3", "1e400", "2.5steps", "-1steps"])
def test_parse_steps_refuses_what_is_no_finite_non_negative_count(text: str):
    with pytest.raises(ConfigError, match="`--interval`"):
        parse_steps(text, "--interval", 10)


# ---------------------------------------------------------------------- run names
def test_default_run_path_takes_the_first_free_name_and_creates_nothing(tmp_path: Path):
    assert default_run_path("mlp", tmp_path) == tmp_path / "mlp.h5"
    (tmp_path / "mlp.h5").write_text("")
    assert default_run_path("mlp", tmp_path) == tmp_path / "mlp-2.h5"
    (tmp_path / "mlp-2.h5").write_text("")
    taken = frozenset({tmp_path / "mlp-3.h5"})  # being created by another process
    assert default_run_path("mlp", tmp_path, taken) == tmp_path / "mlp-4.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp-2.h5", "mlp.h5"]


@pytest.mark.parametrize("race", [RunExistsError, RunLockedError])
def test_at_free_path_takes_the_next_name_when_another_process_wins(tmp_path: Path, race):
    tried: list[Path] = []

    def create(path: Path) -> str:
        tried.append(path)
        if len(tried) < 3:
            raise race(f"{path} taken")
        return f"made {path.name}"

    assert at_free_path("cnn", create, tmp_path) == "made cnn-3.h5"
    assert tried == [tmp_path / "cnn.h5", tmp_path / "cnn-2.h5", tmp_path / "cnn-3.h5"]


def test_at_free_path_gives_up_with_a_clear_error_and_passes_other_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # the real default_run_path rescans every taken name each time: 1000 of them take seconds
    monkeypatch.setattr(
        jobs, "default_run_path", lambda stem, folder, taken: Path(folder) / f"{len(taken)}.h5"
    )
    tried: list[Path] = []

    def always_taken(path: Path):
        tried.append(path)
        raise RunExistsError(str(path))

    with pytest.raises(RunFileError, match="1000 names.*`path`"):
        at_free_path("cnn", always_taken, tmp_path)
    assert len(tried) == len(set(tried)) == 1000  # each name tried once

    def broken(path: Path):
        raise RunFileError("disk on fire")

    with pytest.raises(RunFileError, match="disk on fire"):  # not retried under another name
        at_free_path("cnn", broken, tmp_path)


# ---------------------------------------------------------------------- seeds and the headline
@pytest.mark.parametrize("seed", [0, 2**32 - 1, np.int64(7), np.uint32(2**32 - 1)])
def test_seeds_numpy_and_torch_take_are_accepted(seed):
    assert check_seed(seed) == seed and type(check_seed(seed)) is int
    assert TrainConfig(seed=seed).seed == seed and type(TrainConfig(seed=seed).seed) is int
    np.random.default_rng(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("seed", [-1, 2**32, True, 1.0, "1", None, np.int64(-1)])
def test_other_seeds_are_config_errors(seed):
    with pytest.raises(ConfigError, match="`seed`"):
        check_seed(seed)
    with pytest.raises(ConfigError, match="`seed`"):  # refused when the config is made
        TrainConfig(seed=seed)


def test_headline_formats_the_last_epochs_metric():
    history = [{"val_acc": 0.5}, {"val_acc": 0.97512}]
    assert headline(history) == "val_acc 0.9751"
    reg = [{"val_mse": 0.00217349, "val_rmse_orig": 0.60249}]
    assert headline(reg, "regression") == "val_mse 0.002173"
    assert headline(reg, "regression", "ppm") == "val_mse 0.002173 (standardised; RMSE 0.602 ppm)"
    result = RecordResult(Path("r.h5"), reg, 2, 3, task="regression", unit="ppm")
    assert result.metric == ("val_mse", 0.00217349)
    assert result.summary() == headline(reg, "regression", "ppm")


# ---------------------------------------------------------------------- building a job
def test_build_refuses_a_model_of_another_task_before_loading_anything(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr(jobs, "load_dataset", never)
    with pytest.raises(ConfigError, match="forecaster"):
        build(RecordJob(model="forecaster", dataset="digits"))
    with pytest.raises(ConfigError, match="`seed`"):  # the config refuses it, before a job
        RecordJob(model="mlp", train=TrainConfig(seed=-1))


def test_build_gives_the_zoo_model_of_the_seed_and_its_data():
    model, data = build(RecordJob(model="mlp", dataset="digits", train=TrainConfig(seed=3)))
    want = build_model("mlp", (1, 8, 8), 10, seed=3)
    for (name, got), ref in zip(model.state_dict().items(), want.state_dict().values()):
        assert torch.equal(got, ref), name
    assert data.name == "digits" and len(data.x_train) == 1438


# ---------------------------------------------------------------------- a recorded job
def _replay(job: RecordJob) -> tuple[torch.nn.Module, torch.nn.Module, list[float]]:
    """The job's training done by hand: its initial model, trained model and batch losses."""
    model, data = build(job)
    initial = build(job)[0]
    losses: list[float] = []
    fit(
        model,
        data,
        job.train,
        make_optimizer(model, job.train),
        on_loss=losses.append,
        progress=False,
    )
    return initial, model, losses


def _weights(run, t: int) -> dict[str, np.ndarray]:
    return {info.param_name: run.layer(info.name).original(t) for info in run.layers}


def test_an_epoch_job_records_the_initial_weights_and_each_epochs_metrics(tmp_path: Path):
    job = RecordJob(model="mlp", dataset="digits", train=TINY)
    result = run_record_job(job, tmp_path / "run.h5", progress=False)
    per_epoch = math.ceil(1438 / 512)
    assert (result.n_snapshots, result.n_layers, result.path) == (3, 3, tmp_path / "run.h5")
    initial, trained, _ = _replay(job)
    with bs.open_run(result.path) as run:
        np.testing.assert_array_equal(run.epochs, [0, 1, 2])
        np.testing.assert_array_equal(run.steps, [0, per_epoch, 2 * per_epoch])
        metrics = run.snapshots()
        for name in ("loss", "val_acc", "lr"):
            np.testing.assert_array_equal(
                metrics[name].to_numpy()[1:], [h[name] for h in result.history]
            )
        meta = run.config["metadata"]["job"]
        assert (meta["model"], meta["steps_per_epoch"], meta["train"]["epochs"]) == ("mlp", 3, 2)
        first, last = _weights(run, 0), _weights(run, 2)
    states = initial.state_dict(), trained.state_dict()
    for name in first:
        np.testing.assert_array_equal(first[name], states[0][name].numpy(), err_msg=name)
        np.testing.assert_allclose(last[name], states[1][name].numpy(), rtol=0, atol=1e-6)
    assert result.summary() == f"val_acc {result.history[-1]['val_acc']:.4f}"


def test_a_step_job_snapshots_every_n_steps_with_the_loss_of_that_step(tmp_path: Path):
    job = RecordJob(model="mlp", dataset="digits", train=TINY, schedule="every:2")
    result = run_record_job(job, tmp_path / "run.h5", progress=False)
    _, trained, losses = _replay(job)
    assert len(losses) == 6
    with bs.open_run(result.path) as run:
        np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
        np.testing.assert_allclose(run.epochs, np.array([0, 2, 4, 6]) / 3)
        batch_loss = run.snapshots()["batch_loss"].to_numpy()
        last = _weights(run, 3)
    assert math.isnan(batch_loss[0])  # the initial snapshot has no loss yet
    np.testing.assert_allclose(batch_loss[1:], [losses[1], losses[3], losses[5]], rtol=1e-6)
    for name, value in trained.state_dict().items():
        if name in last:
            np.testing.assert_allclose(last[name], value.numpy(), rtol=0, atol=1e-6)


def test_an_existing_run_is_not_overwritten(tmp_path: Path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"mine")
    with pytest.raises(RunExistsError):
        run_record_job(RecordJob(model="mlp", train=TINY), path, progress=False)
    assert path.read_bytes() == b"mine"


# ---------------------------------------------------------------------- train jobs
@pytest.mark.parametrize(
    ("job", "auto"),
    [
        ({}, True),
        ({"delay": "2"}, False),
        ({"beta": 0.2}, False),
        ({"preset": "reference"}, False),
        ({"auto": True}, True),
        ({"auto": False, "delay": "2"}, False),
        ({"target_share": 0.3}, True),
    ],
)
def test_auto_mode_is_on_only_when_nothing_fixes_the_schedule(job: dict, auto: bool):
    assert auto_mode(TrainJob(**job)) is auto


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        ({"auto": True, "preset": "reference"}, "reference"),
        ({"auto": True, "beta": 0.2}, "beta"),
        ({"auto": False}, "delay"),
        ({"auto": "yes"}, "auto"),
    ],
)
def test_auto_mode_contradictions_are_clear_errors(job: dict, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        auto_mode(TrainJob(**job))


def test_delay_and_interval_in_epochs_or_steps_become_optimizer_steps():
    model = build_model("mlp", (1, 8, 8), 10)
    train = TrainConfig(epochs=6)
    cfg = oialr_config(
        TrainJob(train=train, delay="2", interval="1", beta=0.3), model, steps_per_epoch=10
    )
    assert (cfg.delay, cfg.interval, cfg.beta, cfg.total_steps) == (20, 10, 0.3, 60)
    cfg = oialr_config(
        TrainJob(train=train, delay="25steps", interval="7steps", beta=0.3), model, 10
    )
    assert (cfg.delay, cfg.interval) == (25, 7)
    with pytest.raises(ConfigError, match="interval.*at least one step"):
        oialr_config(TrainJob(train=train, delay="2", interval="0", beta=0.3), model, 10)
    with pytest.raises(ConfigError, match="preset"):
        oialr_config(TrainJob(train=train, preset="fancy"), model, 10)


def test_a_train_job_of_an_unknown_mode_fails_before_any_training(tmp_path: Path):
    with pytest.raises(ConfigError, match="`mode`"):
        run_train_job(TrainJob(model="mlp", mode="half"), tmp_path / "run.h5", progress=False)
    assert not (tmp_path / "run.h5").exists()
