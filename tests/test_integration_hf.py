"""The Hugging Face adapters inside a real ``Trainer.train()`` on a tiny, locally built BERT.

No hub access: the model comes from a ``BertConfig``, the data are synthetic token ids. Every
expectation is checked against an independent oracle: weights captured by test-only
``TrainerCallback``s at the same moments, ``trainer.state.log_history``, the checkpoint folders
the Trainer wrote (``model.safetensors``, ``oialr.json``), or known answers (steps per epoch, the
OIALR schedule).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from helpers.runs import read_all  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import basis_stability as bs  # noqa: E402
from basis_stability.integrations.hf import OIALRTrainer, RecordTrainerCallback  # noqa: E402
from basis_stability.lowrank.layers import LowRankLinear  # noqa: E402
from basis_stability.recommend.plan import PlanConfig  # noqa: E402
from basis_stability.training.oialr import OIALRConfig  # noqa: E402

N_TRAIN, BATCH = 64, 16
STEPS_PER_EPOCH = N_TRAIN // BATCH
DELAY, INTERVAL = 6, 4


def _config() -> BertConfig:
    return BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
    )


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(_config())


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 50, (n, 8), generator=gen)
        self.y = (self.x[:, 0] < 25).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def _args(out: Path, epochs: int, **kw) -> TrainingArguments:
    kw.setdefault("eval_strategy", "epoch")
    kw.setdefault("save_strategy", "no")
    return TrainingArguments(
        str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        logging_strategy="epoch",
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **kw,
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear layer's (dense) weight by parameter name; low-rank layers give U S V^T."""
    return {
        f"{name}.weight": mod.weight.detach().clone()
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, LowRankLinear))
    }


def _assert_same(recorded: dict[str, np.ndarray], captured: dict[str, torch.Tensor]) -> None:
    assert len(recorded) >= 12  # q, k, v, out, ffn in, ffn out of two layers at least
    for name, arr in recorded.items():
        want = captured[name].numpy()
        assert arr.shape == want.shape, name
        assert np.array_equal(arr, want), name


class EpochCapture(TrainerCallback):
    """Test-only oracle: weights and global step at train begin and at every epoch end."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.weights.append(_weights(model))
        self.steps.append(state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.weights.append(_weights(model))
        self.steps.append(state.global_step)


# ============================================================================ RecordTrainerCallback
def test_epoch_mode_snapshots_weights_with_that_epochs_eval_metrics(tmp_path):
    torch.manual_seed(0)
    cap = EpochCapture()
    path = tmp_path / "run.h5"
    trainer = Trainer(
        _model(0),
        _args(tmp_path / "out", 3),
        train_dataset=Tokens(N_TRAIN, 0),
        eval_dataset=Tokens(32, 1),
        compute_metrics=_accuracy,
        callbacks=[cap, RecordTrainerCallback(path)],
    )
    trainer.train()

    steps, epochs, snaps = read_all(path)
    assert steps.tolist() == [0, 4, 8, 12] == cap.steps
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0]
    for t in range(4):
        _assert_same(snaps[t], cap.weights[t])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not np.array_equal(snaps[0][name], snaps[3][name])

    with bs.open_run(path) as run:
        frame = run.snapshots()
        names = run.metric_names
    assert {"eval_accuracy", "eval_loss", "loss"} <= set(names)
    assert not {"epoch", "step", "total_flos"} & set(names)
    assert "epoch (metric)" not in frame.columns
    assert math.isnan(frame["eval_loss"][0])
    history = trainer.state.log_history
    eval_losses = []
    for e in (1, 2, 3):
        (evals,) = [h for h in history if "eval_accuracy" in h and h["epoch"] == e]
        (train,) = [h for h in history if "loss" in h and h["epoch"] == e]
        assert evals["step"] == train["step"] == steps[e]
        for key in ("eval_accuracy", "eval_loss"):
            assert frame[key][e] == evals[key], (key, e)
        assert frame["loss"][e] == train["loss"]
        eval_losses.append(evals["eval_loss"])
    assert len(set(eval_losses)) == 3  # distinct per epoch: a shifted epoch would be caught


class StepCapture(TrainerCallback):
    def __init__(self, n: int) -> None:
        self.n = n
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.weights[0] = _weights(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.n == 0:
            assert state.global_step not in self.weights
            self.weights[state.global_step] = _weights(model)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_schedule_snapshots_exactly_the_multiples(tmp_path, accumulate):
    torch.manual_seed(1)
    cap = StepCapture(3)
    path = tmp_path / "run.h5"
    trainer = Trainer(
        _model(1),
        _args(
            tmp_path / "out",
            3 * accumulate,
            eval_strategy="no",
            gradient_accumulation_steps=accumulate,
        ),
        train_dataset=Tokens(N_TRAIN, 0),
        callbacks=[cap, RecordTrainerCallback(path, "every:3")],
    )
    trainer.train()
    assert trainer.state.global_step == 12

    steps, epochs, snaps = read_all(path)
    assert steps.tolist() == [0, 3, 6, 9, 12]
    assert sorted(cap.weights) == steps.tolist()
    np.testing.assert_allclose(epochs, steps / (STEPS_PER_EPOCH / accumulate))
    for t, step in enumerate(steps):
        _assert_same(snaps[t], cap.weights[int(step)])


# ------------------------------------------------------------------------------ resumption
def _first_phase(tmp_path: Path) -> Path:
    path = tmp_path / "run.h5"
    Trainer(
        _model(2),
        _args(tmp_path / "out", 2, save_strategy="epoch"),
        train_dataset=Tokens(N_TRAIN, 0),
        eval_dataset=Tokens(32, 1),
        compute_metrics=_accuracy,
        callbacks=[RecordTrainerCallback(path)],
    ).train()
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    assert (tmp_path / "out" / "checkpoint-8").is_dir()
    return path


def _resume(tmp_path: Path, checkpoint: str, data_seed: int) -> EpochCapture:
    cap = EpochCapture()
    Trainer(
        _model(3),
        _args(tmp_path / "out2", 4),
        train_dataset=Tokens(N_TRAIN, data_seed),
        eval_dataset=Tokens(32, 1),
        compute_metrics=_accuracy,
        callbacks=[cap, RecordTrainerCallback(tmp_path / "run.h5")],
    ).train(resume_from_checkpoint=str(tmp_path / "out" / checkpoint))
    return cap


def test_resume_from_the_last_checkpoint_appends(tmp_path):
    path = _first_phase(tmp_path)
    _, _, before = read_all(path)

    cap = _resume(tmp_path, "checkpoint-8", data_seed=0)

    steps, epochs, after = read_all(path)
    assert steps.tolist() == [0, 4, 8, 12, 16]
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    for t in range(3):
        for name in before[t]:
            assert np.array_equal(after[t][name], before[t][name])
    _assert_same(after[2], cap.weights[0])  # the restored checkpoint is the last old snapshot
    _assert_same(after[3], cap.weights[1])
    _assert_same(after[4], cap.weights[2])
    assert not list(tmp_path.glob("*.before-resume-*"))


def test_resume_from_an_earlier_checkpoint_moves_later_snapshots_to_a_backup(tmp_path):
    path = _first_phase(tmp_path)  # epochs 0, 1, 2
    _, _, before = read_all(path)

    cap = _resume(tmp_path, "checkpoint-4", data_seed=5)  # other data: another trajectory

    steps, epochs, after = read_all(path)
    assert steps.tolist() == [0, 4, 8, 12, 16]
    assert epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # each exactly once
    for t in range(2):
        for name in before[t]:
            assert np.array_equal(after[t][name], before[t][name])
    for t in range(2, 5):
        _assert_same(after[t], cap.weights[t - 1])
    name = "bert.encoder.layer.0.output.dense.weight"
    assert not np.array_equal(after[2][name], before[2][name])

    (backup,) = tmp_path.glob("run.before-resume-*.h5")
    _, b_epochs, kept = read_all(backup)
    assert b_epochs.tolist() == [0.0, 1.0, 2.0]
    for t in range(3):
        for name in before[t]:
            assert np.array_equal(kept[t][name], before[t][name])


# ============================================================================ OIALRTrainer
class AtBegin(TrainerCallback):
    """Test-only: the model's state and low-rank ranks when training (re)starts."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _oialr_trainer(tmp_path: Path, out: str, callbacks=(), epochs: int = 5, save="epoch"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rc = RecordTrainerCallback(tmp_path / "run.h5")
    trainer = OIALRTrainer(
        _model(4),
        _args(tmp_path / out, epochs, eval_strategy="no", save_strategy=save),
        train_dataset=Tokens(N_TRAIN, 0),
        callbacks=[rc, *callbacks],
        recorder=rc,
        oialr_config=OIALRConfig(delay=DELAY, interval=INTERVAL, beta=0.3),
    )
    return trainer


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _check_optimizer(trainer: Trainer) -> None:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in _trainable(trainer.model)}
    order = {id(p): i for i, p in enumerate(trainer.model.parameters())}
    for group in opt.param_groups:  # each group in the model's order, as a fresh one's
        idx = [order[id(p)] for p in group["params"]]
        assert idx == sorted(idx)


def test_oialr_trainer_converts_updates_and_checkpoints_its_state(tmp_path):
    # stop at step 12 of a 5-epoch schedule: the learning rate follows the 5-epoch decay
    trainer = _oialr_trainer(tmp_path, "out", [StopAt(12)])
    trainer.train()
    assert trainer.state.global_step == 12

    lowrank = {n for n, m in trainer.model.named_modules() if isinstance(m, LowRankLinear)}
    dense = set(trainer.oialr.dense_layers())  # beta 0.3 keeps too many values there to pay
    assert dense and lowrank and not dense & lowrank  # both kinds: resume must rebuild both
    assert len(lowrank | dense) >= 12  # attention and FFN projections of both layers
    assert lowrank == set(trainer.oialr.ranks())
    assert "classifier" not in lowrank  # tall (32, 2): aspect 16 > 10 stays dense
    _check_optimizer(trainer)

    with bs.open_run(tmp_path / "run.h5") as run:
        events = run.events()
    assert [(e["event"], e["step"]) for e in events] == [
        ("convert", 6),
        ("update", 6),
        ("update", 10),
    ]
    assert events == trainer.oialr.events

    for step in (4, 8, 12):
        state = json.loads((tmp_path / "out" / f"checkpoint-{step}" / "oialr.json").read_text())
        assert state["steps"] == step
        if step < DELAY:
            assert state["converted_at"] is None and state["ranks"] == {}
        else:
            assert state["converted_at"] == DELAY
            # every eligible layer is low-rank or kept dense; an update may move it across
            assert set(state["ranks"]) | set(state["dense"]) == lowrank | dense
    assert state["ranks"] == trainer.oialr.ranks() and set(state["dense"]) == dense


def test_oialr_trainer_resumes_after_conversion(tmp_path):
    _oialr_trainer(tmp_path, "out", [StopAt(12)]).train()
    folder = tmp_path / "out" / "checkpoint-12"
    saved_ranks = json.loads((folder / "oialr.json").read_text())["ranks"]
    assert saved_ranks and min(saved_ranks.values()) < 32  # the update at step 10 cut ranks
    saved = safetensors_torch.load_file(str(folder / "model.safetensors"))

    begin = AtBegin()
    trainer = _oialr_trainer(tmp_path, "out2", [begin])
    assert not any(isinstance(m, LowRankLinear) for m in trainer.model.modules())
    trainer.train(resume_from_checkpoint=str(folder))

    assert begin.ranks == saved_ranks
    assert set(saved) <= set(begin.state)
    assert any(k.endswith("factor.S") for k in saved)
    for key, value in saved.items():
        assert torch.equal(begin.state[key], value), key
    _check_optimizer(trainer)
    assert trainer.state.global_step == 20
    assert [(e["event"], e["step"]) for e in trainer.oialr.events] == [
        ("update", 14),
        ("update", 18),
    ]
    with bs.open_run(tmp_path / "run.h5") as run:
        events = [(e["event"], e["step"]) for e in run.events()]
        assert run.epochs.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert events == [("convert", 6), ("update", 6), ("update", 10), ("update", 14), ("update", 18)]

    # the interrupted training ends where an uninterrupted one does
    straight = _oialr_trainer(tmp_path / "straight", "out", save="no")
    straight.train()
    assert straight.oialr.ranks() == trainer.oialr.ranks()
    want, got = straight.model.state_dict(), trainer.model.state_dict()
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_oialr_rollback_keeps_each_decision_once(tmp_path):
    first = _oialr_trainer(tmp_path, "out", [StopAt(12)])
    first.train()  # events: convert 6, update 6, update 10; checkpoints 4, 8, 12
    abandoned = first.oialr.events

    trainer = _oialr_trainer(tmp_path, "out2")
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8"))

    with bs.open_run(tmp_path / "run.h5") as run:
        events = run.events()
        assert run.steps.tolist() == [0, 4, 8, 12, 16, 20]
    assert [(e["event"], e["step"]) for e in events] == [
        ("convert", 6),
        ("update", 6),  # the first cut comes with the conversion
        ("update", 10),
        ("update", 14),
        ("update", 18),
    ]
    assert events[2:] == trainer.oialr.events  # the resumed controller's own decisions
    (backup,) = tmp_path.glob("run.before-resume-*.h5")
    with bs.open_run(backup) as run:
        assert run.events() == abandoned
        assert run.steps.tolist() == [0, 4, 8, 12]


@pytest.mark.parametrize("auto", [True, False])
def test_oialr_trainer_warns_when_auto_mode_never_converted(tmp_path, caplog, auto):
    # auto with lag 1: checks at steps 2, 3, 4, ... but tau 1 is out of reach for moving bases
    plan = PlanConfig(tau=1.0)
    config = (
        OIALRConfig(auto=True, beta=None, check_every=1, lag=1, plan=plan)
        if auto
        else OIALRConfig(delay=2, interval=INTERVAL, beta=0.3)
    )
    trainer = OIALRTrainer(
        _model(4),
        _args(tmp_path / "out", 1, eval_strategy="no"),
        train_dataset=Tokens(N_TRAIN, 0),
        oialr_config=config,
    )
    with caplog.at_level("WARNING", logger="basis_stability"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "never converted" in r.getMessage()]
    if not auto:
        assert lines == [] and trainer.oialr.phase == "low-rank"
        return
    checks = [e for e in trainer.oialr.events if e["event"] == "check"]
    assert len(checks) == STEPS_PER_EPOCH - 1 and trainer.oialr.phase == "full"
    assert lines == [trainer.oialr.never_converted_summary()]
    assert f"in {STEPS_PER_EPOCH} steps: last stable share " in lines[0]
    assert f"last stable share {checks[-1]['stable_share']:.2f} " in lines[0]
