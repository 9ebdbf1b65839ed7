"""What recording costs: training time with the recorder ÷ without, and write throughput ÷ h5py.

(a) The default ``cnn`` on ``digits`` (as ``bstab record`` trains it), trained three ways from the
    same seed: no recorder (baseline), a snapshot after every epoch, and a snapshot every 10
    optimizer steps (``Recorder.attach(optimizer, every(10))``). Recorder creation (file and
    initial snapshot) and closing count as overhead.
(b) Snapshots of several 512x512 Linear layers written by the recorder, against a bare h5py
    append of the same bytes: one file, one extendable dataset per layer chunked ``(1, m, n)``,
    resize + write each layer + flush per snapshot. Throughput in MB/s (1 MB = 1e6 bytes). The
    bare append runs twice, without and with HDF5's fletcher32 checksum filter (which the
    recorder applies since format 1.2), so the checksum's own cost shows side by side.

Runs are interleaved (the order rotates each repeat) and each figure is the median of
``--repeats`` runs. Run it on a quiet machine; ``--quick`` only checks that it works.

    python benchmarks/record_overhead.py [--repeats 5] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from basis_stability import Recorder, every
from basis_stability.jobs import RecordJob, build
from basis_stability.train import TrainConfig, fit, make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, verdict  # noqa: E402

TARGETS = {"per-epoch": 1.02, "every(10)": 1.10, "throughput": 0.8}


# ---------------------------------------------------------------- (a) training overhead
IN_RECORDER: dict[str, list[float]] = {}  # variant -> seconds spent inside recorder calls


class TimedRecorder(Recorder):
    """The recorder, with the time spent inside its calls added up (the direct cost)."""

    spent = 0.0

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TimedRecorder.spent += time.perf_counter() - start

    def __init__(self, *args, **kwargs):
        self._timed(super().__init__, *args, **kwargs)

    def snapshot(self, **kwargs):
        return self._timed(super().snapshot, **kwargs)

    def _on_step(self, *args):
        return self._timed(super()._on_step, *args)

    def log(self, **metrics):
        return self._timed(super().log, **metrics)

    def close(self):
        return self._timed(super().close)


def train_once(variant: str, epochs: int, path: Path) -> float:
    """Seconds to train the default cnn on digits, with the recorder ``variant`` or none."""
    job = RecordJob(train=TrainConfig(epochs=epochs))
    model, data = build(job)
    optimizer = make_optimizer(model, job.train)
    steps_per_epoch = math.ceil(len(data.x_train) / job.train.batch_size)
    TimedRecorder.spent = 0.0
    start = time.perf_counter()
    if variant == "baseline":
        fit(model, data, job.train, optimizer=optimizer, progress=False)
    elif variant == "per-epoch":
        with TimedRecorder(model, path) as rec:

            def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
                rec.snapshot(epoch=epoch, step=epoch * steps_per_epoch, metrics=metrics)

            fit(model, data, job.train, optimizer, on_epoch_end=on_epoch_end, progress=False)
    elif variant == "every(10)":
        with TimedRecorder(model, path) as rec:
            rec.attach(optimizer, every(10), steps_per_epoch=steps_per_epoch)
            fit(
                model,
                data,
                job.train,
                optimizer,
                on_loss=lambda x: rec.log(batch_loss=x),
                progress=False,
            )
    else:
        raise ValueError(variant)
    seconds = time.perf_counter() - start
    IN_RECORDER.setdefault(variant, []).append(TimedRecorder.spent / seconds)
    path.unlink(missing_ok=True)
    return seconds


# ---------------------------------------------------------------- (b) write throughput
def big_model(n_layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(n_layers)))


def write_recorder(model: nn.Module, n_snapshots: int, path: Path) -> float:
    """Seconds for the recorder to write ``n_snapshots`` snapshots (file already created)."""
    rec = Recorder(model, path, initial=False)
    start = time.perf_counter()
    for t in range(n_snapshots):
        rec.snapshot(step=t, epoch=t)
    rec.close()
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def write_bare(
    arrays: list[np.ndarray], n_snapshots: int, path: Path, checksum: bool = False
) -> float:
    """Seconds for a bare h5py append of the same matrices (file already created)."""
    with h5py.File(path, "w") as f:
        datasets = [
            f.create_dataset(
                str(i),
                shape=(0, *a.shape),
                maxshape=(None, *a.shape),
                chunks=(1, *a.shape),
                dtype=a.dtype,
                fletcher32=checksum,
            )
            for i, a in enumerate(arrays)
        ]
        f.flush()
        start = time.perf_counter()
        for t in range(n_snapshots):
            for ds, a in zip(datasets, arrays):
                ds.resize(t + 1, axis=0)
                ds.write_direct(a, dest_sel=np.s_[t])
            f.flush()
    seconds = time.perf_counter() - start  # includes the close, as the recorder's does
    path.unlink()
    return seconds


# ---------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 5)")
    parser.add_argument("--quick", action="store_true", help="few epochs and repeats: smoke test")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--layers", type=int, default=8, help="512x512 layers for (b)")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots for (b)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else TrainConfig().epochs)
    n_snapshots = args.snapshots or (10 if args.quick else 40)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bstab-bench-") as tmp:
        folder = Path(tmp)
        print(
            f"(a) cnn on digits, {epochs} epochs, {repeats} repeats, "
            f"{torch.get_num_threads()} torch threads"
        )
        for variant in ("baseline", "per-epoch", "every(10)"):  # first-call costs off the clock
            train_once(variant, 1, folder / "warmup.h5")
        train = interleaved(
            {
                v: (lambda v=v: train_once(v, epochs, folder / "run.h5"))
                for v in ("baseline", "per-epoch", "every(10)")
            },
            repeats,
        )
        model = big_model(args.layers, 512)
        arrays = [layer.weight.detach().numpy().copy() for layer in model]
        mb = n_snapshots * sum(a.nbytes for a in arrays) / 1e6
        print(
            f"(b) {args.layers} Linear 512x512 layers, {n_snapshots} snapshots "
            f"({mb:.0f} MB), {repeats} repeats"
        )
        write = interleaved(
            {
                "recorder": lambda: write_recorder(model, n_snapshots, folder / "rec.h5"),
                "bare h5py": lambda: write_bare(arrays, n_snapshots, folder / "bare.h5"),
                "bare h5py + fletcher32": lambda: write_bare(
                    arrays, n_snapshots, folder / "sum.h5", checksum=True
                ),
            },
            repeats,
        )

    med = {k: statistics.median(v) for k, v in {**train, **write}.items()}
    rows = [
        ("train, no recorder", f"{med['baseline']:.3f} s", "", "", ""),
    ]
    for variant in ("per-epoch", "every(10)"):
        IN_RECORDER[variant] = IN_RECORDER[variant][-repeats:]  # drop the warm-up
        ratio = med[variant] / med["baseline"]
        target = TARGETS[variant]
        rows.append(
            (
                f"train, {variant} snapshots",
                f"{med[variant]:.3f} s",
                f"{ratio:.3f}",
                f"<= {target:.2f}",
                verdict(ratio, target, higher_is_better=False),
            )
        )
    rec_mbs, bare_mbs = mb / med["recorder"], mb / med["bare h5py"]
    sum_mbs = mb / med["bare h5py + fletcher32"]
    ratio = rec_mbs / bare_mbs
    rows.append(("write, bare h5py", f"{bare_mbs:.0f} MB/s", "", "", ""))
    rows.append(
        (
            "write, bare h5py + fletcher32",
            f"{sum_mbs:.0f} MB/s",
            f"{sum_mbs / bare_mbs:.3f}",
            "",
            "",
        )
    )
    rows.append(
        (
            "write, recorder",
            f"{rec_mbs:.0f} MB/s",
            f"{ratio:.3f}",
            f">= {TARGETS['throughput']:.2f}",
            verdict(ratio, TARGETS["throughput"], higher_is_better=True),
        )
    )
    header = ("measure (median)", "value", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\ndirect cost: time inside recorder calls / training time (median)")
    for variant in ("per-epoch", "every(10)"):
        print(f"  {variant:<10s} {100 * statistics.median(IN_RECORDER[variant]):.2f} %")
    if args.quick:
        print("\n--quick: too few epochs and repeats for the ratios to mean anything.")


if __name__ == "__main__":
    sys.exit(main())
