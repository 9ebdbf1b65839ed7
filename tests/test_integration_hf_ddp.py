"""RecordTrainerCallback under the Hugging Face Trainer with DDP: torchrun, two gloo processes.

Both ranks run the callback; only global rank 0 writes. The run holds the initial weights and one
snapshot per epoch at the job's global step, each equal to the replicas' weights at that epoch end
(saved by a test-only callback on both ranks).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import basis_stability as bs  # noqa: E402

SCRIPT = Path(__file__).parent / "helpers" / "hf_ddp_train.py"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_under_torchrun_records_once_from_rank_zero(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    result = subprocess.run(
        [*cmd, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world 2 rank 0" in result.stdout and "world 2 rank 1" in result.stdout

    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["run.h5"]
    with bs.open_run(tmp_path / "run.h5") as run:
        frame = run.snapshots()
        assert frame["epoch"].tolist() == [0.0, 1.0, 2.0]
        assert frame["step"].tolist() == [0, 4, 8]  # 64 samples, batch 8 per rank, 2 ranks
        for epoch in (1, 2):
            seen = [torch.load(tmp_path / f"rank{r}-epoch{epoch}.pt") for r in (0, 1)]
            assert seen[0]["step"] == seen[1]["step"] == frame["step"][epoch]
            for info in run.layers:
                recorded = run.layer(info.name).original(epoch)
                for r in (0, 1):
                    np.testing.assert_array_equal(recorded, seen[r]["w"][info.param_name].numpy())
