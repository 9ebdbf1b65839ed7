"""Small traps of issue 11: inspect steps, the exists message, densify_, compare_export."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from basis_stability.errors import ConfigError, RunExistsError
from basis_stability.exporting.factorized import compare_export, export_factorized
from basis_stability.lowrank import densify_, factor_of, factorize_
from basis_stability.recording.recorder import Recorder
from basis_stability.store.reader import open_run
from basis_stability.store.summary import summarize


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _steps_field(path) -> str:
    (line,) = [ln for ln in summarize(path, scan=False).splitlines() if ln.startswith("snapshots")]
    return re.search(r"steps (.*?)   wall", line).group(1)


def test_inspect_says_steps_not_recorded_when_no_snapshot_after_the_initial_has_a_step(tmp_path):
    path = tmp_path / "run.h5"
    with Recorder(_mlp(), path) as rec:
        rec.snapshot(epoch=1)  # no step given: stored as -1 (unknown)
        rec.snapshot(epoch=2)
    assert _steps_field(path) == "not recorded"


def test_inspect_says_steps_not_recorded_for_the_initial_snapshot_alone(tmp_path):
    path = tmp_path / "run.h5"
    Recorder(_mlp(), path).close()
    assert _steps_field(path) == "not recorded"


def test_inspect_still_shows_the_span_of_known_steps(tmp_path):
    path = tmp_path / "run.h5"
    with Recorder(_mlp(), path) as rec:
        rec.snapshot(epoch=1, step=10)
        rec.snapshot(epoch=2, step=20)
    assert _steps_field(path) == "0 -> 20"


def test_recording_into_an_existing_run_names_mode_overwrite_and_the_advice_works(tmp_path):
    path = tmp_path / "run.h5"
    Recorder(_mlp(), path).close()
    with pytest.raises(RunExistsError, match=re.escape("mode='overwrite'")):
        Recorder(_mlp(), path)
    with Recorder(_mlp(), path, mode="overwrite") as rec:
        rec.snapshot(epoch=1, step=5)
    with open_run(path) as run:
        assert run.n_snapshots == 2
        assert run.steps.tolist() == [0, 5]


def _trained_low_rank() -> tuple[nn.Module, nn.Module]:
    """A dense MLP and a factorised, truncated copy of it (as after OIALR training)."""
    dense = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8))
    low = copy.deepcopy(dense)
    factorize_(low)
    factor_of(low[0]).rotate_and_truncate_(4)
    factor_of(low[2]).rotate_and_truncate_(2)
    return dense, low


def test_compare_export_refuses_a_still_factorised_model_as_the_dense_baseline():
    _, low = _trained_low_rank()
    with pytest.raises(ConfigError, match=r"`dense`.*low-rank layer\(s\): 0, 2\. Call densify_"):
        compare_export(low, export_factorized(low), torch.randn(4, 20), repeats=1)


def test_compare_export_refuses_an_unexported_low_rank_model_as_the_factorized_one():
    dense, low = _trained_low_rank()
    with pytest.raises(ConfigError, match=r"`factorized`.*: 0, 2\. Pass export_factorized"):
        compare_export(dense, low, torch.randn(4, 20), repeats=1)


def test_densify_returns_the_model_so_compare_export_takes_it():
    _, low = _trained_low_rank()
    exported = export_factorized(low)
    baseline = copy.deepcopy(low)
    assert densify_(baseline) is baseline
    report = compare_export(densify_(copy.deepcopy(low)), exported, torch.randn(4, 20), repeats=1)
    assert report.params_dense == 20 * 16 + 16 + 16 * 8 + 8
    assert report.params_factorized == (20 * 4 + 4 * 16 + 16) + (16 * 2 + 2 * 8 + 8)


def _lightning_fit(root, path, epochs: int, ckpt_path=None) -> None:
    """A tiny real Lightning fit recording into ``path``, checkpointing every epoch."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from basis_stability.integrations.lightning import RecordCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    ck = ModelCheckpoint(dirpath=root / "ck", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[RecordCallback(path), ck],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)


def _epochs(path) -> list[float]:
    with open_run(path) as run:
        return run.epochs.tolist()


def test_lightning_resume_with_the_absolute_path_finds_the_state_saved_under_a_relative_one(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "job"
    root.mkdir()
    monkeypatch.chdir(root)
    _lightning_fit(root, "run.h5", epochs=2)  # relative path, from the run's folder
    ckpt = root / "ck" / "epoch=0-step=2.ckpt"
    monkeypatch.chdir(tmp_path)  # resume from elsewhere, naming the run by its absolute path
    _lightning_fit(root, root / "run.h5", epochs=3, ckpt_path=ckpt)
    # the state said: 2 snapshots when the checkpoint was taken, so epoch 2 was redone
    assert _epochs(root / "run.h5") == [0.0, 1.0, 2.0, 3.0]
    assert "the checkpoint recorded into" not in caplog.text


def test_lightning_accepts_a_state_saved_under_the_old_path_as_given_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _lightning_fit(tmp_path, "run.h5", epochs=2)
    ckpt = tmp_path / "ck" / "epoch=1-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if str(k).startswith("RecordCallback[")]
    assert key == f"RecordCallback[{tmp_path.resolve() / 'run.h5'}]"
    state = saved["callbacks"].pop(key)  # rewrite it as releases before the fix saved it
    saved["callbacks"]["RecordCallback[run.h5]"] = {**state, "path": "run.h5"}
    torch.save(saved, ckpt)
    _lightning_fit(tmp_path, tmp_path / "run.h5", epochs=3, ckpt_path=ckpt)
    assert _epochs(tmp_path / "run.h5") == [0.0, 1.0, 2.0, 3.0]
