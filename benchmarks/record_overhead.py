"""What recording costs: training time with the recorder ÷ without, and write throughput ÷ h5py.

(a) The default ``cnn`` on ``digits`` (as ``bstab record`` trains it), trained five ways from the
    same seed: no recorder (baseline), a snapshot after every epoch, and a snapshot every 10
    optimizer steps (``Recorder.attach(optimizer, every(10))``), each of the two with the
    recorder's background writer (``background=True``, the default) and without it
    (``background=False``). Two figures per variant: the wall-time ratio to the baseline, and
    the direct cost, the time spent inside recorder calls ÷ training time (creation with its
    initial snapshot, every snapshot, and closing, which waits for the last background write).
    The targets are on the direct cost. Side by side, the background variants again with live
    stability (``live=LiveStability(tensorboard=...)``: every layer's S against the snapshot
    before and the mean S, computed on the writer thread and written to TensorBoard), and the
    ratio of their direct cost and wall time to the same variant without it.
(b) Snapshots of several 512x512 Linear layers written by the recorder (both ways; timed to the
    end of close(), so the background writes are all in), against a bare h5py append of the
    same bytes: one file, one extendable dataset per layer chunked ``(1, m, n)``, resize + write
    each layer + flush per snapshot. Throughput in MB/s (1 MB = 1e6 bytes). The bare append runs
    twice, without and with HDF5's fletcher32 checksum filter (which the recorder applies since
    format 1.2), so the checksum's own cost shows side by side. The background recorder runs
    once more with live stability: 512x512 layers are where its float64 SVDs show.
(c) Whether h5py holds the GIL while it writes: the longest pause of a pure-Python loop on this
    thread while another thread runs one ``write_direct`` of 128 MiB (fletcher32), and while the
    recorder's background writer writes the snapshots of (b).

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
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from basis_stability import LiveStability, Recorder, every
from basis_stability.jobs import RecordJob, build
from basis_stability.training import TrainConfig, fit, make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, verdict  # noqa: E402

# direct cost (time inside recorder calls / training time) at most, and throughput at least
TARGETS = {"per-epoch": 0.005, "every(10)": 0.02, "throughput": 0.8}
SCHEDULES = ("per-epoch", "every(10)")
MODES = {"background": True, "sync": False}  # the label -> RecordConfig.background
LIVE = "background + live S"  # the background recorder with live=LiveStability(tensorboard=...)
VARIANTS = ["baseline"] + [f"{s}, {m}" for s in SCHEDULES for m in [*MODES, LIVE]]


# ---------------------------------------------------------------- (a) training overhead
IN_RECORDER: dict[str, list[float]] = {}  # variant -> seconds spent inside recorder calls


class TimedRecorder(Recorder):
    """The recorder, with the time spent inside its calls added up (the direct cost).

    Only the outermost call counts: the optimizer hook ``_on_step`` calls ``snapshot``, whose
    time used to be added twice (the direct cost of every(10) was overstated by its snapshots'
    share).
    """

    spent = 0.0
    depth = 0

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        TimedRecorder.depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            TimedRecorder.depth -= 1
            if TimedRecorder.depth == 0:
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
    """Seconds to train the default cnn on digits, with the recorder ``variant`` (e.g.
    ``"every(10), background"``) or none (``"baseline"``)."""
    job = RecordJob(train=TrainConfig(epochs=epochs))
    model, data = build(job)
    optimizer = make_optimizer(model, job.train)
    steps_per_epoch = math.ceil(len(data.x_train) / job.train.batch_size)
    schedule, _, mode = variant.partition(", ")
    background = MODES.get(mode, True)
    live = LiveStability(tensorboard=path.with_suffix(".tb")) if mode == LIVE else None
    TimedRecorder.spent = 0.0
    start = time.perf_counter()
    if variant == "baseline":
        fit(model, data, job.train, optimizer=optimizer, progress=False)
    elif schedule == "per-epoch":
        with TimedRecorder(model, path, background=background, live=live) as rec:

            def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
                rec.snapshot(epoch=epoch, step=epoch * steps_per_epoch, metrics=metrics)

            fit(model, data, job.train, optimizer, on_epoch_end=on_epoch_end, progress=False)
    elif schedule == "every(10)":
        with TimedRecorder(model, path, background=background, live=live) as rec:
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


def write_recorder(
    model: nn.Module, n_snapshots: int, path: Path, background: bool, live: bool = False
) -> float:
    """Seconds for the recorder to write ``n_snapshots`` snapshots (file already created);
    ``live``: with live stability too (its TensorBoard folder beside the run)."""
    measure = LiveStability(tensorboard=path.with_suffix(".tb")) if live else None
    rec = Recorder(model, path, initial=False, background=background, live=measure)
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


# ---------------------------------------------------------------- (c) the GIL
def longest_pause(work) -> tuple[float, float]:
    """``(longest pause, seconds)``: how long a pure-Python loop on this thread was held up at
    most while ``work()`` ran on another thread, and how long ``work`` took."""
    worker = threading.Thread(target=work)
    start = last = time.perf_counter()
    worst = 0.0
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    worker.join()
    return worst, last - start


def pause_in_write_direct(path: Path) -> tuple[float, float]:
    """The pause of this thread during one 128 MiB ``write_direct`` (fletcher32) + flush."""
    data = np.random.default_rng(0).random((8192, 4096), dtype=np.float32)
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset(
            "x", shape=(1, *data.shape), chunks=(1, *data.shape), dtype=data.dtype, fletcher32=True
        )
        f.swmr_mode = True

        def work() -> None:
            ds.write_direct(data, dest_sel=np.s_[0])
            f.flush()

        result = longest_pause(work)
    path.unlink()
    return result


def pause_in_background_writes(model: nn.Module, n_snapshots: int, path: Path) -> tuple:
    """The longest pause of this thread while the recorder's writer thread writes each of
    ``n_snapshots`` snapshots (this thread hands each over, then loops until it is committed)."""
    rec = Recorder(model, path, initial=False)
    worst = busy = 0.0
    for t in range(n_snapshots):
        rec.snapshot(step=t, epoch=t)
        pause, seconds = longest_pause(rec.flush)  # flush() returns once the write is committed
        worst, busy = max(worst, pause), busy + seconds
    rec.close()
    path.unlink()
    return worst, busy


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
        for variant in VARIANTS:  # first-call costs off the clock
            train_once(variant, 1, folder / "warmup.h5")
        train = interleaved(
            {v: (lambda v=v: train_once(v, epochs, folder / "run.h5")) for v in VARIANTS},
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
                "recorder": lambda: write_recorder(model, n_snapshots, folder / "rec.h5", True),
                "recorder, sync": lambda: write_recorder(
                    model, n_snapshots, folder / "sync.h5", False
                ),
                "recorder, live S": lambda: write_recorder(
                    model, n_snapshots, folder / "live.h5", True, live=True
                ),
                "bare h5py": lambda: write_bare(arrays, n_snapshots, folder / "bare.h5"),
                "bare h5py + fletcher32": lambda: write_bare(
                    arrays, n_snapshots, folder / "sum.h5", checksum=True
                ),
            },
            repeats,
        )
        print(f"(c) the GIL: {min(n_snapshots, 10)} background snapshots of (b), 128 MiB write")
        gil = {
            "write_direct 128 MiB + flush": pause_in_write_direct(folder / "gil.h5"),
            "recorder's background writes": pause_in_background_writes(
                model, min(n_snapshots, 10), folder / "gil-rec.h5"
            ),
        }

    med = {k: statistics.median(v) for k, v in {**train, **write}.items()}
    print_table(train_rows(med, repeats), ("training (median)", "wall", "ratio", "direct"))
    print("\ndirect cost of each repeat, in run order (a busy machine shows as outliers):")
    for variant in VARIANTS[1:]:
        print(f"  {variant:<30s} " + "  ".join(f"{100 * x:5.2f} %" for x in IN_RECORDER[variant]))
    live_header = ("live S (median)", "without", "with live", "with ÷ without")
    print_table(live_rows(med, repeats), live_header)
    print(
        f"  {'live S, 512x512 layers of (b)':<22s}  {mb / med['recorder']:.0f} MB/s without, "
        f"{mb / med['recorder, live S']:.0f} MB/s with: "
        f"{med['recorder, live S'] / med['recorder']:.2f}x the time"
    )
    print_table(write_rows(med, mb), ("writing (median)", "value", "ratio"))
    print("\n(c) longest pause of a Python loop on the training thread while h5py writes:")
    for name, (pause, seconds) in gil.items():
        print(f"  {name:<30s} {1e3 * pause:6.1f} ms in {1e3 * seconds:7.1f} ms of writing")
    if args.quick:
        print("\n--quick: too few epochs and repeats for the ratios to mean anything.")


def train_rows(med: dict[str, float], repeats: int) -> list[tuple[str, ...]]:
    rows = [("no recorder", f"{med['baseline']:.3f} s", "", "", "", "")]
    for variant in VARIANTS[1:]:
        IN_RECORDER[variant] = IN_RECORDER[variant][-repeats:]  # drop the warm-up
        direct = statistics.median(IN_RECORDER[variant])
        if variant.endswith(LIVE):  # an option on top: compared with its variant below
            rows.append((variant, f"{med[variant]:.3f} s", "", f"{100 * direct:.2f} %", "", ""))
            continue
        target = TARGETS[variant.partition(", ")[0]]
        rows.append(
            (
                variant,
                f"{med[variant]:.3f} s",
                f"{med[variant] / med['baseline']:.3f}",
                f"{100 * direct:.2f} %",
                f"<= {100 * target:.1f} %",
                verdict(direct, target, higher_is_better=False),
            )
        )
    return rows


def live_rows(med: dict[str, float], repeats: int) -> list[tuple[str, ...]]:
    """Per schedule, the background recorder's direct cost and wall time without and with live
    stability, and their ratio (with ÷ without)."""
    rows = []
    for schedule in SCHEDULES:
        without, with_live = f"{schedule}, background", f"{schedule}, {LIVE}"
        d0, d1 = (statistics.median(IN_RECORDER[v][-repeats:]) for v in (without, with_live))
        rows.append(
            (
                f"{schedule}: direct cost",
                f"{100 * d0:.2f} %",
                f"{100 * d1:.2f} %",
                f"{d1 / d0:.2f}x",
                "",
                "",
            )
        )
        rows.append(
            (
                f"{schedule}: wall time",
                f"{med[without]:.3f} s",
                f"{med[with_live]:.3f} s",
                f"{med[with_live] / med[without]:.3f}",
                "",
                "",
            )
        )
    return rows


def write_rows(med: dict[str, float], mb: float) -> list[tuple[str, ...]]:
    bare = mb / med["bare h5py"]
    rows = [("bare h5py", f"{bare:.0f} MB/s", "", "", "")]
    for name in ("bare h5py + fletcher32", "recorder, sync", "recorder"):
        mbs = mb / med[name]
        target = name == "recorder"  # the default recorder carries the target
        rows.append(
            (
                name.replace("recorder", "recorder, background") if target else name,
                f"{mbs:.0f} MB/s",
                f"{mbs / bare:.3f}",
                f">= {TARGETS['throughput']:.2f}" if target else "",
                verdict(mbs / bare, TARGETS["throughput"], higher_is_better=True) if target else "",
            )
        )
    return rows


def print_table(rows: list[tuple[str, ...]], first: tuple[str, ...]) -> None:
    header = (*first, "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
