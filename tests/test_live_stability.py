"""Live stability (``live=LiveStability(...)``): the S logged at every snapshot while recording.

The oracle is ``bs.analyze(run)`` on the run the same recording wrote: every logged
``stability/S/<layer>`` must be its consecutive-pair S (a NaN where analyze gives NaN, for a
rank-deficient layer), ``stability/S_mean`` its parameter-weighted network mean (``weighted_S``
with ``lag=1``), each at the step of the later snapshot of the pair. Read back from TensorBoard's
event file, Lightning's CSVLogger and the Hugging Face Trainer's ``on_log``.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import basis_stability as bs
from basis_stability.analysis import AnalysisConfig
from basis_stability.errors import ConfigError, MissingExtraError
from basis_stability.recording import every

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

EVERY, STEPS = 3, 12  # snapshots at steps 0, 3, ..., 12
DEFICIENT = "layers.1"  # how the name of the rank-deficient layer ends: its S is NaN


class Tiny(nn.Module):
    """Three Linear layers; the middle one (``1``) keeps a zero output row through training
    (its gradient there is masked), so its tall (12, 10) matrix has rank 9."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 3)])
        weight = self.layers[1].weight
        with torch.no_grad():
            weight[0] = 0
        mask = torch.ones_like(weight)
        mask[0] = 0
        weight.register_hook(lambda grad: grad * mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.tanh(layer(x))
        return x


def _train(model: Tiny, steps: int, opt: torch.optim.Optimizer | None = None) -> None:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        loss = (model(x) - x[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _record(path: Path, live: bs.LiveStability, **options) -> bs.Recorder:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with bs.Recorder(model, path, live=live, **options).attach(opt, every(EVERY)) as rec:
        _train(model, STEPS, opt)
    return rec


def expected(path: Path) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """``{layer: {step: S}}`` of the consecutive pairs and ``{step: weighted_S}``, by analyze."""
    report = bs.analyze(path, AnalysisConfig(lag=1))
    pairs = report.stability[report.stability["pair"] == "consecutive"]
    per_layer = {
        layer: dict(zip(g["step_b"].astype(int), g["S"].astype(float)))
        for layer, g in pairs.groupby("layer")
    }
    mean = dict(zip(report.network["step"].astype(int), report.network["weighted_S"]))
    # the network mean by hand: weights m n, NaN layers left out
    with bs.open_run(path) as run:
        sizes = {info.name: info.n_params for info in run.layers}
    for step, value in mean.items():
        s = np.array([per_layer[n][step] for n in sizes])
        w = np.array([sizes[n] for n in sizes], dtype=float)
        known = ~np.isnan(s)
        assert value == pytest.approx((s[known] * w[known]).sum() / w[known].sum(), rel=1e-12)
    return per_layer, mean


def _close(got: float, want: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= 1e-6 * max(1.0, abs(want))  # float32 scalars, float64 maths


def _check(logged: dict[str, dict[int, float]], path: Path, prefix: str = "") -> None:
    """``logged``: ``{tag: {step: value}}`` as one logger read it back."""
    per_layer, mean = expected(path)
    steps = list(range(EVERY, STEPS + 1, EVERY))  # the first snapshot (step 0) logs nothing
    assert len(per_layer) == 3
    (deficient,) = [name for name in per_layer if name.endswith(DEFICIENT)]
    assert all(math.isnan(v) for v in per_layer[deficient].values())
    others = [v for name, g in per_layer.items() if name != deficient for v in g.values()]
    assert not any(map(math.isnan, others))
    for layer, want in per_layer.items():
        got = logged[f"{prefix}stability/S/{layer}"]
        assert sorted(got) == steps == sorted(want), layer
        bad = {s: (got[s], want[s]) for s in steps if not _close(got[s], want[s])}
        assert not bad, f"layer {layer}: {bad}"
    got = logged[f"{prefix}stability/S_mean"]
    assert sorted(got) == steps
    assert all(_close(got[s], mean[s]) for s in steps), (got, mean)
    assert all(not math.isnan(v) for v in got.values())  # the NaN layer is left out


def _events(folder: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------- Recorder + TensorBoard
@pytest.mark.parametrize("background", [True, False], ids=["background", "calling-thread"])
def test_tensorboard_scalars_are_analyze_s_at_the_snapshot_steps(tmp_path: Path, background):
    tb = tmp_path / "tb"
    rec = _record(tmp_path / "run.h5", bs.LiveStability(tensorboard=tb), background=background)
    _check(_events(tb), tmp_path / "run.h5")
    taken = rec.live_metrics()  # the same values, kept for the caller, also after close()
    assert [step for step, _ in taken] == list(range(EVERY, STEPS + 1, EVERY))
    events = _events(tb)
    for step, values in taken:
        for tag, value in values.items():
            assert np.float32(value) == pytest.approx(events[tag][step], nan_ok=True)
    assert rec.live_metrics() == []  # taken once


def test_without_tensorboard_the_values_wait_for_live_metrics(tmp_path: Path):
    model = Tiny()
    with bs.record(model, tmp_path / "run.h5", live=bs.LiveStability()) as rec:
        assert rec.live_metrics(wait=True) == []  # the initial snapshot has no pair
        _train(model, 2)
        rec.snapshot(step=2)
        (step, values), *rest = rec.live_metrics(wait=True)
    assert step == 2 and rest == []
    layers = {f"stability/S/{view.name}" for view in rec.views}
    assert set(values) == {*layers, "stability/S_mean"} and len(layers) == 3


def test_a_failing_live_measurement_warns_once_and_the_recording_goes_on(tmp_path: Path):
    class Broken:
        def __init__(self) -> None:
            self.calls = 0

        def start(self, views):
            return self

        def observe(self, step, matrices, storage):
            self.calls += 1
            if self.calls == 2:
                raise OSError("no space left for the event file")

        def take(self):
            return []

        def close(self):
            pass

    broken = Broken()
    model = Tiny()
    recorder = bs.Recorder(model, tmp_path / "run.h5", live=broken)
    with pytest.warns(RuntimeWarning, match="no space left") as caught, recorder as rec:
        for step in (1, 2, 3, 4):
            _train(model, 1)
            rec.snapshot(step=step)
    assert sum("live values" in str(w.message) for w in caught) == 1
    assert broken.calls == 2  # stopped after its failure
    with bs.open_run(tmp_path / "run.h5") as run:
        assert list(run.steps) == [0, 1, 2, 3, 4]


def test_a_snapshot_that_waits_for_the_live_values_says_so_once(tmp_path: Path, caplog):
    class Slow:
        def start(self, views):
            return self

        def observe(self, step, matrices, storage):
            time.sleep(0.3)

        def take(self):
            return []

        def close(self):
            pass

    model = Tiny()
    with caplog.at_level("WARNING"), bs.Recorder(model, tmp_path / "run.h5", live=Slow()) as rec:
        for step in (1, 2, 3):
            rec.snapshot(step=step)  # each waits for the measurement of the one before
    slow = [r for r in caplog.records if "waited" in r.getMessage()]
    assert len(slow) == 1 and "live values" in slow[0].getMessage()


# ---------------------------------------------------------------------- errors
def test_bad_options_are_refused_naming_them(tmp_path: Path):
    with pytest.raises(ConfigError, match="`tensorboard`") as err:
        bs.LiveStability(tensorboard=3)
    assert err.value.arguments == ("tensorboard",)
    with pytest.raises(ConfigError, match="`live`") as err:
        bs.Recorder(Tiny(), tmp_path / "run.h5", live="tensorboard:runs")
    assert err.value.arguments == ("live",)
    assert not (tmp_path / "run.h5").exists()


def test_tensorboard_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtraError) as err:
        bs.LiveStability(tensorboard="runs/tb")
    assert "pip install 'basis_stability[tensorboard]'" in str(err.value)
    assert "`tensorboard` package" in str(err.value)
    bs.LiveStability()  # without a directory it needs no tensorboard


# ---------------------------------------------------------------------- Lightning
def test_lightning_logger_gets_the_live_values_at_the_snapshot_steps(tmp_path: Path):
    L = pytest.importorskip("lightning.pytorch")  # noqa: N806
    from lightning.pytorch.loggers import CSVLogger

    from basis_stability.integrations.lightning import RecordCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Tiny()

        def training_step(self, batch, batch_idx):
            return (self.net(batch[0]) - batch[0][:, :3]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    data = torch.utils.data.TensorDataset(torch.randn(4 * 8, 6, generator=_gen()))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 4 steps an epoch, 3 epochs
    callback = RecordCallback(
        tmp_path / "run.h5", schedule=f"every:{EVERY}", live=bs.LiveStability()
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        callbacks=[callback],
        logger=CSVLogger(tmp_path, name="csv", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    trainer.fit(Module(), loader)
    logged: dict[str, dict[int, float]] = {}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag.startswith("stability/") and value != "":
                    logged.setdefault(tag, {})[int(row["step"])] = float(value)
    _check(logged, tmp_path / "run.h5")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(2)


# ---------------------------------------------------------------------- Hugging Face
def test_hf_report_to_loggers_get_the_live_values_at_the_snapshot_steps(tmp_path: Path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from basis_stability.integrations.hf import RecordTrainerCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Tiny()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": (out - labels).pow(2).mean(), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x = torch.randn(4 * 8, 6, generator=_gen())

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.x[i, :3]}

    class Logs(tf.TrainerCallback):
        def __init__(self) -> None:
            self.logged: dict[str, dict[int, float]] = {}

        def on_log(self, args, state, control, logs=None, **kw):
            for tag, value in (logs or {}).items():
                if tag.startswith("stability/"):
                    self.logged.setdefault(tag, {})[state.global_step] = value

    model, logs = Model(), Logs()
    args = tf.TrainingArguments(
        str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=0.2,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
    )
    rec = RecordTrainerCallback(tmp_path / "run.h5", f"every:{EVERY}", live=bs.LiveStability())
    trainer = tf.Trainer(model, args, train_dataset=Data(), callbacks=[logs])
    rec.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no failure of the live values
        trainer.train()
    _check(logs.logged, tmp_path / "run.h5")  # every callback's on_log
    history = {
        t: {e["step"]: e[t] for e in trainer.state.log_history if t in e} for t in logs.logged
    }
    _check(history, tmp_path / "run.h5")  # state.log_history
    # the report_to integration (TensorBoard, which prefixes "train/") at the same steps
    _check(_events(next((tmp_path / "out" / "runs").iterdir())), tmp_path / "run.h5", "train/")
    with bs.open_run(tmp_path / "run.h5") as run:  # the snapshots do not store them as metrics
        assert not any("stability" in name for name in run.metric_names)


def test_snapshots_without_a_step_log_at_their_index_not_all_at_one_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with bs.record(model, tmp_path / "r.h5", live=bs.LiveStability()) as rec:
        for epoch in range(1, 4):
            opt.zero_grad()
            model(torch.randn(8, 6)).sum().backward()
            opt.step()
            rec.snapshot(epoch=epoch)  # no step: the run stores -1
    assert [step for step, _ in rec.live_metrics(wait=True)] == [1, 2, 3]
