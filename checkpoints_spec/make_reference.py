"""Write the tiny reference run file of the current format version.

    python checkpoints_spec/make_reference.py [OUT]     (default: checkpoints_spec/reference_v1.h5)

Its contents follow closed-form rules, so a test can check every number it reads back:

- four layers covering the tall rule: ``fc`` a Linear weight of shape (3, 4) (stored transposed
  as 4x3), ``conv`` a Conv2d weight (2, 1, 2, 2) (stored as reshape(2, 4).T, 4x2),
  ``attn.in_proj`` a MultiheadAttention in_proj_weight (6, 2) (stored as is), and ``h.c_proj`` a
  square transformers-Conv1D weight (3, 3) stored (in, out) (format 1.3: stored transposed);
- three committed snapshots t = 0, 1, 2 with step = 10 t, epoch = t, and in the parameter's own
  shape ``value[idx] = t + 0.1 * flat_index(idx)``;
- metric ``loss = 1 / (t + 1)`` from snapshot 1 on (NaN at 0), ``acc = 0.5 + 0.2 t`` at every one;
- two state entries (format 1.3, ``/state``): ``fc.bias`` (3,) float32 with
  ``value[i] = t + 0.5 * i``, and ``bn.num_batches_tracked`` (0-D int64) ``= 10 t``; the index
  lists the model's state-dict keys (the four weights, the two entries and ``head.weight``,
  tied to ``fc.weight``);
- a half-written fourth snapshot (layer ``fc`` and ``/state/float32`` grown to 4 rows, filled
  with 99) that every reader must ignore;
- two events (format 1.1): ``{"event": "check", "step": 10, "stable_share": 0.5}`` and
  ``{"event": "convert", "step": 20, "beta": 0.15}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from basis_stability.registry import IN_OUT
from basis_stability.store import state as st
from basis_stability.store.writer import RunWriter
from basis_stability.views import LayerView

LAYERS = [
    LayerView.of("fc", "fc.weight", "linear", (3, 4)),
    LayerView.of("conv", "conv.weight", "conv2d", (2, 1, 2, 2)),
    LayerView.of("attn.in_proj", "attn.in_proj_weight", "mha", (6, 2)),
    LayerView.of("h.c_proj", "h.c_proj.weight", "linear", (3, 3), IN_OUT),
]
STATE = [("fc.bias", "float32", (3,)), ("bn.num_batches_tracked", "int64", ())]
MODEL_KEYS = [
    st.ModelKey("fc.weight", (3, 4), "float32"),
    st.ModelKey("fc.bias", (3,), "float32"),
    st.ModelKey("conv.weight", (2, 1, 2, 2), "float32"),
    st.ModelKey("attn.in_proj_weight", (6, 2), "float32"),
    st.ModelKey("h.c_proj.weight", (3, 3), "float32"),
    st.ModelKey("bn.num_batches_tracked", (), "int64"),
    st.ModelKey("head.weight", (3, 4), "float32"),
]
TIED = {"head.weight": "fc.weight"}
N_SNAPSHOTS = 3
EVENTS = [
    {"event": "check", "step": 10, "stable_share": 0.5},
    {"event": "convert", "step": 20, "beta": 0.15},
]


def param_value(view: LayerView, t: int) -> np.ndarray:
    """The layer's parameter at snapshot ``t`` in its own shape."""
    size = int(np.prod(view.orig_shape))
    return (t + 0.1 * np.arange(size, dtype=np.float64)).reshape(view.orig_shape).astype(np.float32)


def state_at(t: int) -> dict[str, np.ndarray]:
    """The state entries at snapshot ``t``."""
    return {
        "fc.bias": (t + 0.5 * np.arange(3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(10 * t, dtype=np.int64),
    }


def metrics_at(t: int) -> dict[str, float]:
    return {"acc": 0.5 + 0.2 * t} if t == 0 else {"acc": 0.5 + 0.2 * t, "loss": 1.0 / (t + 1)}


def write_reference(path: Path) -> Path:
    config = {"metadata": {"purpose": "format reference file"}, "dtype": "float32"}
    state = st.plan(STATE, MODEL_KEYS, TIED)
    with RunWriter.create(
        path, LAYERS, model_class="ReferenceModel", config=config, force=True, state=state
    ) as writer:
        for t in range(N_SNAPSHOTS):
            mats = (view.matrix(torch.from_numpy(param_value(view, t))).numpy() for view in LAYERS)
            writer.append(
                mats, step=10 * t, epoch=float(t), metrics=metrics_at(t), state=state_at(t)
            )
        for event in EVENTS:
            writer.log_event(event)
    with h5py.File(path, "r+", libver="latest") as f:  # a half-written, uncommitted snapshot
        for ds in (f["layers/fc"], f["state/float32"]):
            ds.resize(N_SNAPSHOTS + 1, axis=0)
            ds[N_SNAPSHOTS] = 99.0
    return path


if __name__ == "__main__":
    default = Path(__file__).with_name("reference_v1.h5")
    print(write_reference(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
