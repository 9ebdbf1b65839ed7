"""The Lightning adapters inside a real ``Trainer.fit()`` on a tiny LightningModule.

Every expectation is checked against an independent oracle: weights and metrics captured by
test-only callbacks at the same moments, the checkpoint files Lightning wrote, or known answers
(batches per epoch, the OIALR schedule).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

import lightning.pytorch as L  # noqa: E402, N812
from helpers.runs import read_all  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import basis_stability as bs  # noqa: E402
from basis_stability.errors import ConfigError, RunExistsError  # noqa: E402
from basis_stability.integrations.lightning import OIALRCallback, RecordCallback  # noqa: E402
from basis_stability.lowrank.layers import LowRankLinear  # noqa: E402
from basis_stability.training.oialr import OIALRConfig  # noqa: E402

N, BATCH = 64, 16
BATCHES = N // BATCH  # batches (and, without accumulation, optimizer steps) per epoch
LAYERS = {"net.0.weight", "net.2.weight", "net.4.weight"}


def _data(seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        **kw,
    )


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's (dense) weight by parameter name; low-rank layers give U S V^T."""
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Linear, LowRankLinear)):
            out[f"{name}.weight"] = mod.weight.detach().clone()
    return out


class Capture(L.Callback):
    """Test-only oracle: the module's weights, step and metrics at train start and epoch ends."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.weights.append(_weights(pl_module))
        self.steps.append(trainer.global_step)
        self.metrics.append({})

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(_weights(pl_module))
        self.steps.append(trainer.global_step)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _assert_same(recorded: dict[str, np.ndarray], captured: dict[str, torch.Tensor]) -> None:
    assert set(recorded) == LAYERS
    for name, arr in recorded.items():
        want = captured[name].numpy()
        assert arr.shape == want.shape, name
        assert np.array_equal(arr, want), name


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# ============================================================================ RecordCallback
def test_epoch_schedule_snapshots_weights_and_metrics_at_every_epoch_end(tmp_path):
    torch.manual_seed(0)
    cap = Capture()
    path = tmp_path / "run.h5"
    trainer = _trainer(tmp_path, [cap, RecordCallback(path)], max_epochs=3)
    trainer.fit(Net(), _data(0), _data(1))

    steps, epochs, snaps = read_all(path)
    assert steps.tolist() == [0, BATCHES, 2 * BATCHES, 3 * BATCHES] == cap.steps
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert len(snaps) == len(cap.weights) == 4
    for t in range(4):
        _assert_same(snaps[t], cap.weights[t])
    # the weights really moved: the oracle comparison is not between four copies of one state
    assert not np.array_equal(snaps[0]["net.2.weight"], snaps[3]["net.2.weight"])

    with bs.open_run(path) as run:
        frame = run.snapshots()
    assert {"val_acc", "val_loss", "train_loss"} <= set(frame.columns)
    assert math.isnan(frame["val_loss"][0])  # the initial weights carry no metrics
    val_losses = [cap.metrics[t]["val_loss"] for t in range(1, 4)]
    assert len(set(val_losses)) == 3  # distinct per epoch: a shifted epoch would be caught
    for t in range(1, 4):
        for name in ("val_acc", "val_loss", "train_loss"):
            assert frame[name][t] == pytest.approx(cap.metrics[t][name], rel=1e-7, abs=0), (
                name,
                t,
            )


class StepCapture(L.Callback):
    """Test-only oracle: weights after every optimizer step whose number is a multiple of n."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        self.weights[0] = _weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        if step % self.n == 0 and step not in self.weights:
            self.weights[step] = _weights(pl_module)


@pytest.mark.parametrize("schedule", [bs.every(5), "every:5"], ids=["every(5)", "text"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_schedule_snapshots_exactly_the_multiples(tmp_path, schedule, accumulate):
    torch.manual_seed(1)
    cap = StepCapture(5)
    path = tmp_path / "run.h5"
    epochs = 4 * accumulate  # 16 optimizer steps either way
    trainer = _trainer(
        tmp_path,
        [cap, RecordCallback(path, schedule)],
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
    )
    trainer.fit(Net(), _data(0))
    total = trainer.global_step
    assert total == epochs * BATCHES // accumulate == 16

    steps, stamped, snaps = read_all(path)
    assert steps.tolist() == [0, 5, 10, 15]  # each once, even when a step spans two batches
    assert sorted(cap.weights) == steps.tolist()
    steps_per_epoch = BATCHES / accumulate
    np.testing.assert_allclose(stamped, steps / steps_per_epoch)
    for t, step in enumerate(steps):
        _assert_same(snaps[t], cap.weights[int(step)])


# ------------------------------------------------------------------------------ resumption
def _first_phase(tmp_path: Path, epochs: int = 2) -> tuple[Path, Path, Capture]:
    torch.manual_seed(2)
    path = tmp_path / "run.h5"
    cap = Capture()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path, [cap, RecordCallback(path), ck], max_epochs=epochs).fit(
        Net(), _data(0), _data(1)
    )
    return path, tmp_path / "ck", cap


def test_resume_from_last_checkpoint_appends_and_keeps_earlier_snapshots(tmp_path):
    path, ck, cap1 = _first_phase(tmp_path)
    steps0, epochs0, before = read_all(path)
    assert epochs0.tolist() == [0, 1, 2]
    ckpt = ck / f"epoch=1-step={2 * BATCHES}.ckpt"
    assert ckpt.is_file()

    torch.manual_seed(3)
    cap2 = Capture()
    trainer = _trainer(tmp_path, [cap2, RecordCallback(path)], max_epochs=4)
    trainer.fit(Net(), _data(0), _data(1), ckpt_path=ckpt)

    steps, epochs, after = read_all(path)
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert steps.tolist() == [0, 4, 8, 12, 16]
    assert np.all(np.diff(steps) > 0)
    for t in range(3):  # the snapshots of the first fit are untouched
        for name in LAYERS:
            assert np.array_equal(after[t][name], before[t][name])
    # cap2[0] is the restored checkpoint (== snapshot 2); then the two new epochs
    _assert_same(after[2], cap2.weights[0])
    _assert_same(after[3], cap2.weights[1])
    _assert_same(after[4], cap2.weights[2])
    assert not list(tmp_path.glob("*.before-resume-*"))  # nothing was rolled back


def test_resume_from_an_earlier_checkpoint_moves_abandoned_snapshots_to_a_backup(tmp_path):
    path, ck, _ = _first_phase(tmp_path)  # run: epochs 0, 1, 2
    _, _, before = read_all(path)
    ckpt = ck / f"epoch=0-step={BATCHES}.ckpt"  # taken after epoch 1
    assert ckpt.is_file()

    torch.manual_seed(4)
    cap = Capture()
    trainer = _trainer(tmp_path, [cap, RecordCallback(path)], max_epochs=4)
    trainer.fit(Net(), _data(5), _data(6), ckpt_path=ckpt)  # other data: another trajectory

    steps, epochs, after = read_all(path)
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # each exactly once
    assert steps.tolist() == [0, 4, 8, 12, 16]
    for t in range(2):
        for name in LAYERS:
            assert np.array_equal(after[t][name], before[t][name])
    for t in range(2, 5):  # the new training's epoch ends
        _assert_same(after[t], cap.weights[t - 1])
    assert not np.array_equal(after[2]["net.2.weight"], before[2]["net.2.weight"])

    backups = list(tmp_path.glob("run.before-resume-*.h5"))
    assert len(backups) == 1
    b_steps, b_epochs, backup = read_all(backups[0])
    assert b_epochs.tolist() == [0.0, 1.0, 2.0]  # the whole run as it was, abandoned epoch too
    for t in range(3):
        for name in LAYERS:
            assert np.array_equal(backup[t][name], before[t][name])


def test_create_mode_refuses_an_existing_run_without_a_checkpoint(tmp_path):
    path, _, _ = _first_phase(tmp_path, epochs=1)
    size = path.stat().st_size
    trainer = _trainer(tmp_path, [RecordCallback(path)], max_epochs=1)
    with pytest.raises(Exception) as info:
        trainer.fit(Net(), _data(0), _data(1))
    assert any(isinstance(e, RunExistsError) for e in _chain(info.value)) or (
        "already exists" in str(info.value)
    )
    assert path.stat().st_size == size
    with bs.open_run(path) as run:
        assert run.n_snapshots == 2


# ============================================================================ OIALRCallback
DELAY, INTERVAL = 6, 4


def _oialr_config() -> OIALRConfig:
    # every layer factorised whatever its rank (the callback's mechanics, not the pay rule)
    return OIALRConfig(delay=DELAY, interval=INTERVAL, beta=0.3, dense_when_larger=False)


class AroundConversion(L.Callback):
    """Test-only: the outputs on a fixed batch at the end of one step, before or after OIALR."""

    def __init__(self, step: int, x: torch.Tensor) -> None:
        self.step, self.x = step, x
        self.out: torch.Tensor | None = None
        self.kinds: set[type] = set()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step and self.out is None:
            with torch.no_grad():
                self.out = pl_module(self.x).clone()
            self.kinds = {type(m) for m in pl_module.net if not isinstance(m, nn.ReLU)}


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(float(outputs["loss"]))


def _trainable_ids_in_order(module: nn.Module) -> list[int]:
    return [id(p) for p in module.parameters() if p.requires_grad]


def test_oialr_callback_converts_updates_and_keeps_the_optimizer_in_step(tmp_path):
    torch.manual_seed(5)
    x_fixed = torch.randn(10, 8)
    before = AroundConversion(DELAY, x_fixed)
    after = AroundConversion(DELAY, x_fixed)
    losses = Losses()
    rc = RecordCallback(tmp_path / "run.h5")
    # the first cut one interval later: the conversion itself must leave the outputs unchanged
    config = dataclasses.replace(_oialr_config(), first_cut="one_interval_later")
    oc = OIALRCallback(config, recorder=rc)
    epochs = 6  # 24 steps: convert at 6, update at 10, 14, 18, 22
    trainer = _trainer(tmp_path, [losses, rc, before, oc, after], max_epochs=epochs)
    module = Net(lr=0.1)
    trainer.fit(module, _data(0), _data(1))

    lowrank = {n for n, m in module.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == {"net.0", "net.2", "net.4"}
    assert set(oc.oialr.ranks()) == lowrank
    full = {"net.0": 8, "net.2": 16, "net.4": 2}  # min(m, n) of each layer
    ranks = oc.oialr.ranks()
    assert all(1 <= ranks[n] <= full[n] for n in full), ranks
    assert ranks["net.2"] < full["net.2"], ranks  # beta = 0.3 cut the square layer
    assert {n: m.rank for n, m in module.named_modules() if n in lowrank} == ranks

    with bs.open_run(tmp_path / "run.h5") as run:
        events = run.events()
        n_snapshots = run.n_snapshots
    assert [(e["event"], e["step"]) for e in events] == [("convert", DELAY)] + [
        ("update", s) for s in range(DELAY + INTERVAL, epochs * BATCHES + 1, INTERVAL)
    ]
    assert events == oc.oialr.events
    assert n_snapshots == epochs + 1  # recording went on through the conversion

    # exact conversion: same outputs on either side of the step that converted
    assert before.kinds == {nn.Linear} and after.kinds == {LowRankLinear}
    torch.testing.assert_close(after.out, before.out, rtol=1e-5, atol=1e-5)

    # the optimizer holds exactly the trainable parameters, in a fresh optimizer's order
    opt = trainer.optimizers[0]
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert held == _trainable_ids_in_order(module)
    assert set(opt.state) <= set(p for g in opt.param_groups for p in g["params"])

    # training went on: the last epoch's loss is below the epoch of the conversion
    per_epoch = np.array(losses.losses).reshape(epochs, BATCHES).mean(1)
    assert per_epoch[-1] < per_epoch[DELAY // BATCHES]
    assert np.isfinite(per_epoch).all()


class StartState(L.Callback):
    """Test-only: the module's state and low-rank ranks when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.ranks = {
            n: m.rank for n, m in pl_module.named_modules() if isinstance(m, LowRankLinear)
        }


def _oialr_fit(tmp_path: Path, epochs: int, ckpt_path=None, data_seed=0, callbacks=()):
    """A recorded OIALR fit of Net(seed 6) into tmp_path/run.h5, checkpointing every epoch."""
    torch.manual_seed(6)
    module = Net(lr=0.1)
    rc = RecordCallback(tmp_path / "run.h5")
    oc = OIALRCallback(_oialr_config(), recorder=rc)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(tmp_path, [rc, oc, *callbacks, ck], max_epochs=epochs)
    trainer.fit(module, _data(data_seed), _data(1), ckpt_path=ckpt_path)
    return module, oc, trainer


def test_oialr_resume_after_conversion_rebuilds_low_rank_layers(tmp_path):
    _, oc, _ = _oialr_fit(tmp_path / "a", epochs=3)  # convert at 6, update at 10
    ckpt_path = tmp_path / "a" / "ck" / f"epoch=2-step={3 * BATCHES}.ckpt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved_ranks = saved["callbacks"][oc.state_key]["ranks"]
    assert set(saved_ranks) == {"net.0", "net.2", "net.4"}
    assert saved_ranks["net.2"] < 16  # the update at step 10 cut it: not a fresh factorisation

    start = StartState()
    module, oc2, trainer = _oialr_fit(
        tmp_path / "a", epochs=5, ckpt_path=ckpt_path, callbacks=[start]
    )

    # rebuilt at the checkpoint's ranks, then loaded with exactly the checkpoint's weights
    assert start.ranks == saved_ranks
    assert set(start.state) == set(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        assert torch.equal(start.state[key], value), key
    assert oc2.oialr.converted_at == DELAY
    assert [e["step"] for e in oc2.oialr.events if e["event"] == "update"] == [14, 18]
    with bs.open_run(tmp_path / "a" / "run.h5") as run:
        events = [(e["event"], e["step"]) for e in run.events()]
        assert run.epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert events == [("convert", 6), ("update", 6), ("update", 10), ("update", 14), ("update", 18)]
    opt = trainer.optimizers[0]
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert held == _trainable_ids_in_order(module)

    # the interrupted training ends where an uninterrupted one does (optimizer state included)
    straight, oc3, _ = _oialr_fit(tmp_path / "b", epochs=5)
    assert oc3.oialr.ranks() == oc2.oialr.ranks()
    want = straight.state_dict()
    got = module.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_oialr_rollback_drops_the_abandoned_decisions_from_the_run(tmp_path):
    _oialr_fit(tmp_path, epochs=3)  # run: epochs 0..3; events: convert 6, update 6, 10
    with bs.open_run(tmp_path / "run.h5") as run:
        abandoned = run.events()
    assert [(e["event"], e["step"]) for e in abandoned] == [
        ("convert", 6),
        ("update", 6),
        ("update", 10),
    ]

    ckpt_path = tmp_path / "ck" / f"epoch=1-step={2 * BATCHES}.ckpt"  # after convert, before 10
    _, oc, _ = _oialr_fit(tmp_path, epochs=5, ckpt_path=ckpt_path, data_seed=3)

    with bs.open_run(tmp_path / "run.h5") as run:
        events = run.events()
        assert run.epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # each decision once: the abandoned update at step 10 is not kept beside the new one
    assert [(e["event"], e["step"]) for e in events] == [
        ("convert", 6),
        ("update", 6),  # the first cut comes with the conversion
        ("update", 10),
        ("update", 14),
        ("update", 18),
    ]
    assert events[:2] == abandoned[:2]  # the conversion and its first cut, before the rollback
    assert events[2:] == oc.oialr.events  # the resumed controller's own decisions
    (backup,) = tmp_path.glob("run.before-resume-*.h5")
    with bs.open_run(backup) as run:
        assert run.events() == abandoned
        assert run.epochs.tolist() == [0.0, 1.0, 2.0, 3.0]


class TwoOptimizers(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2:].parameters(), lr=0.1),
        ]


def test_oialr_callback_refuses_two_optimizers(tmp_path):
    torch.manual_seed(8)
    trainer = _trainer(tmp_path, [OIALRCallback(_oialr_config())], max_epochs=1)
    with pytest.raises(Exception) as info:
        trainer.fit(TwoOptimizers(), _data(0))
    errors = [e for e in _chain(info.value) if isinstance(e, ConfigError)]
    assert errors, info.value
    assert "one optimizer" in str(errors[0]) and "2" in str(errors[0])


def test_oialr_callback_refuses_multi_process_trainers():
    callback = OIALRCallback(_oialr_config())
    with pytest.raises(ConfigError, match="single-process"):
        callback.setup(SimpleNamespace(world_size=2), Net(), "fit")
    callback.setup(SimpleNamespace(world_size=2), Net(), "validate")  # only fit matters


@pytest.mark.parametrize("auto", [True, False])
def test_oialr_callback_warns_when_auto_mode_never_converted(tmp_path, caplog, auto):
    # auto: the first check needs lag + 1 = 6 checks of 4 steps; 2 epochs are 8 steps
    config = OIALRConfig(auto=True, beta=None, check_every=4, lag=5) if auto else _oialr_config()
    torch.manual_seed(9)
    oc = OIALRCallback(config)
    with caplog.at_level("WARNING", logger="basis_stability"):
        _trainer(tmp_path, [oc], max_epochs=2).fit(Net(), _data(0), _data(1))
    lines = [r.getMessage() for r in caplog.records if "never converted" in r.getMessage()]
    if not auto:
        assert lines == [] and oc.oialr.phase == "low-rank"
        return
    assert lines == [oc.oialr.never_converted_summary()] and oc.oialr.phase == "full"
    assert lines[0].startswith(
        "OIALR auto mode never converted in 8 steps: no stability check ran (the first needs "
        "24 steps"
    )
