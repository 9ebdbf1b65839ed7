"""RecordCallback under Lightning's DDP (two gloo processes on CPU): one run file, rank 0 writes.

Both processes run the callback; only global rank 0 may open the file. The run must hold one
snapshot per epoch with the global step of the whole job, and each snapshot must equal the
replica's weights at that epoch end (identical on both ranks under DDP), saved by a test-only
callback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

L = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import basis_stability as bs  # noqa: E402
from basis_stability.integrations.lightning import RecordCallback  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Capture(L.Callback):
    """Saves every rank's weights and who it was at each epoch end (before the recorder)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer, module):
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch + 1}.pt"
        torch.save({"weights": weights, "step": trainer.global_step}, self.folder / name)


def test_ddp_fit_records_once_from_rank_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 8 batches: 4 per rank and epoch
    run_path = tmp_path / "run.h5"
    trainer = L.Trainer(
        max_epochs=2,
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
        callbacks=[Capture(str(tmp_path)), RecordCallback(run_path)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Net(), loader)

    h5 = sorted(p.name for p in tmp_path.glob("*.h5"))
    assert h5 == ["run.h5"]  # no file from rank 1, no temporary leftovers
    assert not list(tmp_path.glob(".*partial"))
    with bs.open_run(run_path) as run:
        frame = run.snapshots()
        assert frame["epoch"].tolist() == [0.0, 1.0, 2.0]
        assert frame["step"].tolist() == [0, 4, 8]
        for epoch in (1, 2):
            seen = [torch.load(tmp_path / f"rank{r}-epoch{epoch}.pt") for r in (0, 1)]
            assert seen[0]["step"] == seen[1]["step"] == frame["step"][epoch]
            for info in run.layers:
                recorded = run.layer(info.name).original(epoch)
                for r in (0, 1):  # DDP keeps the replicas identical: both equal the record
                    expected = seen[r]["weights"][info.param_name].numpy()
                    np.testing.assert_array_equal(recorded, expected)
    assert not dist.is_initialized()
