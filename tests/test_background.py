"""Snapshots written by the recorder's background thread (``RecordConfig(background=True)``).

Oracles: the synchronous recorder (``background=False``) writing the same snapshots, byte for
byte; numpy copies of the weights taken before the test changes them; plain h5py for the file.
A gate held in front of the writer's ``append`` keeps a snapshot in flight for as long as a test
needs, so "changed while being written" is certain, not a race the test hopes to win.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basis_stability import Recorder, open_run
from basis_stability.errors import ConfigError, WriteFailedError
from basis_stability.recording import RecordConfig
from basis_stability.store.validate import validate_run

sys.path.insert(0, str(Path(__file__).with_name("helpers")))
from crash_trial import (  # noqa: E402
    INTERVAL_S,
    TrialResult,
    Writer,
    check_snapshots,
    read_counts,
)

KILL_SIZES = "256,256,128,64"  # three Linear layers, 448 KiB of float32 per snapshot


class Zoo(nn.Module):
    """Every kind of thing a snapshot copies: tall and wide matrices, a conv, an embedding,
    attention, a bfloat16 layer, BatchNorm buffers (int64 counter), a bool and a float16 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 20)  # wide: stored transposed
        self.low = nn.Linear(5, 3).to(torch.bfloat16)
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("scale", torch.tensor(0.5, dtype=torch.float16))


@torch.no_grad()
def _perturb(model: nn.Module, t: int) -> None:
    """A deterministic 'training step': every parameter and buffer changes."""
    gen = torch.Generator().manual_seed(t)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.bool:
            tensor.logical_not_()
        elif tensor.dtype == torch.int64:
            tensor.add_(1)
        else:
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            tensor.add_(noise.to(tensor.device, tensor.dtype))


def _record_zoo(path: Path, background: bool, dtype: str, n: int = 4) -> None:
    torch.manual_seed(0)
    model = Zoo()
    types = ("linear", "conv*", "mha", "embedding")
    with Recorder(model, path, dtype=dtype, types=types, background=background) as rec:
        for t in range(1, n + 1):
            _perturb(model, t)
            rec.log(loss=torch.tensor(1.0 / t))
            assert rec.snapshot(step=10 * t, epoch=t, metrics={"t": t}) == t
            if t == 2:
                rec.log_event({"event": "between", "step": 10 * t})


def _contents(path: Path) -> dict[str, object]:
    """Every stored value of a run, by dataset path (wall-clock times left out)."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if name == "snapshots":
                    data = (data["step"].tolist(), data["epoch"].tolist())
                out[name] = data if isinstance(data, tuple) else data.tobytes()

        f.visititems(visit)
        out["config"] = f.attrs["config"]
    return out


def _gate(rec: Recorder) -> tuple[threading.Event, threading.Event]:
    """Hold the background writer before each snapshot's write until ``release`` is set;
    ``entered`` tells that a write is being held."""
    entered, release = threading.Event(), threading.Event()
    append = rec._writer.append

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(60), "the test never released the writer"
        return append(*args, **kwargs)

    rec._writer.append = held
    return entered, release


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


# ------------------------------------------------------------------------------ what is stored
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_background_run_is_byte_identical_to_the_synchronous_one(tmp_path, dtype):
    _record_zoo(tmp_path / "sync.h5", background=False, dtype=dtype)
    _record_zoo(tmp_path / "background.h5", background=True, dtype=dtype)
    sync, background = _contents(tmp_path / "sync.h5"), _contents(tmp_path / "background.h5")
    assert sorted(sync) == sorted(background)
    assert any(name.startswith("state/") for name in sync)  # biases and buffers are in it
    for name in sync:
        assert sync[name] == background[name], f"{name} differs"
    assert validate_run(tmp_path / "background.h5").ok


def test_weights_changed_right_after_snapshot_returns_do_not_reach_the_file(tmp_path):
    model, path = _model(), tmp_path / "run.h5"
    loss = torch.tensor(0.25)
    with Recorder(model, path) as rec:
        entered, release = _gate(rec)
        before = _weights(model)
        assert rec.snapshot(epoch=1, metrics={"loss": loss}) == 1
        assert entered.wait(30)  # snapshot 1 is in flight, not yet written
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.fill_(-12345.0)
        loss.fill_(9.0)
        release.set()
        rec.flush()
    with open_run(path) as run:
        assert run.n_snapshots == 2
        for name, key in (("0", "0.weight"), ("2", "2.weight")):
            stored = run.layer(name).original(1)
            assert stored.tobytes() == before[key].tobytes()  # bit for bit
        state = run.state(1)
        for key in ("0.bias", "2.bias"):
            assert state[key].tobytes() == before[key].tobytes()
        assert run.metrics_array()[1, run.metric_names.index("loss")] == 0.25


def test_one_snapshot_in_flight_the_next_waits_for_its_commit(tmp_path):
    model, path = _model(), tmp_path / "run.h5"
    with Recorder(model, path) as rec:
        entered, release = _gate(rec)
        first = _weights(model)
        rec.snapshot(epoch=1)
        assert entered.wait(30)
        assert (rec._writer.n_snapshots, rec.n_snapshots) == (1, 2)  # the one in flight counts
        _perturb(model, 2)
        second = _weights(model)  # copied into the other buffers while snapshot 1 is written
        timer = threading.Timer(0.3, release.set)
        timer.start()
        start = time.perf_counter()
        assert rec.snapshot(epoch=2) == 2
        waited = time.perf_counter() - start
        assert waited >= 0.25, f"snapshot 2 did not wait for snapshot 1 ({waited:.3f} s)"
        assert rec._writer.n_snapshots >= 2  # snapshot 1 was committed before 2 was copied
        rec.flush()
        assert (rec._writer.n_snapshots, rec.n_snapshots) == (3, 3)
        timer.join()
    with open_run(path) as run:
        for t, want in ((1, first), (2, second)):
            assert run.layer("0").original(t).tobytes() == want["0.weight"].tobytes()
            assert run.state(t)["2.bias"].tobytes() == want["2.bias"].tobytes()


def test_buffers_are_reused_and_never_the_weights_themselves(tmp_path):
    model = _model()
    handed: list[list[np.ndarray]] = []
    with Recorder(model, tmp_path / "run.h5") as rec:
        append = rec._writer.append

        def spy(matrices, **kwargs):
            handed.append(list(matrices))
            return append(handed[-1], **kwargs)

        rec._writer.append = spy
        for epoch in (1, 2, 3):
            rec.snapshot(epoch=epoch)
            rec.flush()  # no write in flight at the next snapshot: the same buffers again
    assert len(handed) == 3
    for first, later in zip(handed[0], handed[2]):
        assert np.shares_memory(first, later)  # the same host buffer every snapshot
    weights = [model[0].weight.detach().numpy(), model[2].weight.detach().numpy()]
    assert not any(np.shares_memory(a, w) for a in handed[0] for w in weights)


def test_writes_run_on_the_writer_thread_and_no_state_dict_is_copied(tmp_path, monkeypatch):
    threads: list[str] = []
    real_write = h5py.Dataset.write_direct
    real_state_dict = nn.Module.state_dict

    def spy_write(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_write(self, *args, **kwargs)

    def no_state_dict(self, *args, keep_vars=False, **kwargs):
        if not keep_vars:
            raise AssertionError("the recorder must not copy a whole state_dict")
        return real_state_dict(self, *args, keep_vars=True, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "write_direct", spy_write)
    monkeypatch.setattr(nn.Module, "state_dict", no_state_dict)
    with Recorder(_model(), tmp_path / "run.h5") as rec:
        rec.snapshot(epoch=1)
        rec.snapshot(epoch=2)
    # the initial snapshot is written while opening, on this thread; the others are not
    assert threads[:3] == ["MainThread"] * 3  # two layers and the bias row
    assert len(threads) == 9 and all(n.startswith("bstab-writer") for n in threads[3:])
    assert not [t for t in threading.enumerate() if t.name.startswith("bstab-writer")]


def test_events_keep_their_place_among_snapshots_and_their_values_of_the_call(tmp_path):
    path = tmp_path / "run.h5"
    with Recorder(_model(), path) as rec:
        order: list[tuple[int, int]] = []
        write_event = rec._writer.write_event

        def spy(text: bytes) -> None:
            order.append((json.loads(text)["i"], rec._writer.n_snapshots))
            write_event(text)

        rec._writer.write_event = spy
        entered, release = _gate(rec)
        rec.snapshot(epoch=1)
        event = {"i": 0, "ranks": [1]}
        rec.log_event(event)  # queued behind snapshot 1, which is still held
        event["ranks"].append(2)
        assert entered.wait(30) and order == []
        release.set()
        rec.snapshot(epoch=2)
        rec.log_event({"i": 1, "ranks": []})
    assert order == [(0, 2), (1, 3)]  # each after the snapshot given before it was committed
    with open_run(path) as run:
        assert [e["ranks"] for e in run.events()] == [[1], []]


# ------------------------------------------------------------------------------ failures
def _fail_next_write(rec: Recorder) -> None:
    """Make the writer's next snapshot fail as a full disk does, inside its data phase."""
    writer = rec._writer

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    writer._write_rows = full_disk


def _until_written(rec: Recorder) -> None:
    """Wait, without the recorder's own waiting, until the background write has ended."""
    deadline = time.monotonic() + 30
    while rec._thread._last is not None and not rec._thread._last.done():
        assert time.monotonic() < deadline, "the background write never ended"
        time.sleep(0.01)


FAILED = r"Writing snapshot 2 to .*run\.h5 failed: .*No space left on device.* keeps its 2 earlier"


@pytest.mark.parametrize("call", ["snapshot", "log_event", "flush", "close"])
def test_a_failed_background_write_is_raised_once_by_the_next_call(tmp_path, capfd, call):
    model, path = _model(), tmp_path / "run.h5"
    rec = Recorder(model, path)
    rec.snapshot(epoch=1)
    rec.flush()
    _fail_next_write(rec)
    assert rec.snapshot(epoch=2) == 2  # returns: the write fails on the writer thread
    _until_written(rec)
    calls = {
        "snapshot": lambda: rec.snapshot(epoch=3),
        "log_event": lambda: rec.log_event({"event": "x"}),
        "flush": rec.flush,
        "close": rec.close,
    }
    with pytest.raises(WriteFailedError, match=FAILED):
        calls[call]()
    assert rec.n_snapshots == 2  # the failed snapshot is not counted once it is known
    if call != "close":  # the writer stays stopped, and says so at once
        with pytest.raises(WriteFailedError, match="stopped after an earlier write error"):
            rec.snapshot(epoch=4)
    closing = threading.Thread(target=rec.close)  # raises nothing more, and does not hang
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "close() hangs after a failed background write"
    rec.close()
    assert "Traceback" not in capfd.readouterr().err  # no thread printed its own
    report = validate_run(path)
    assert report.ok and report.n_snapshots == 2, [str(f) for f in report.findings]
    with open_run(path) as run:
        assert run.epochs.tolist() == [0.0, 1.0]


def test_operations_queued_behind_a_failed_write_are_not_written(tmp_path):
    path = tmp_path / "run.h5"
    rec = Recorder(_model(), path)
    entered, release = _gate(rec)
    _fail_next_write(rec)
    rec.snapshot(epoch=1)
    assert entered.wait(30)
    rec.log_event({"event": "after the failed snapshot"})  # queued before the failure is known
    release.set()
    with pytest.raises(WriteFailedError, match=r"Writing snapshot 1 .* keeps its 1 earlier"):
        rec.close()
    with open_run(path) as run:
        assert run.n_snapshots == 1 and run.events() == []


def test_bad_metrics_are_refused_by_the_call_that_gives_them(tmp_path):
    with Recorder(_model(), tmp_path / "run.h5") as rec:
        with pytest.raises(ConfigError, match=r"metrics\['loss'\]"):
            rec.snapshot(epoch=1, metrics={"loss": "low"})
        rec.snapshot(epoch=1, metrics={"loss": 0.5})  # the recorder goes on
        assert rec.n_snapshots == 2


def test_a_model_that_changed_shape_is_refused_by_snapshot(tmp_path):
    model = _model()
    with Recorder(model, tmp_path / "run.h5") as rec:
        model[0].weight = nn.Parameter(torch.zeros(8, 5))
        with pytest.raises(ConfigError, match=r"layer 0 to be a \(8, 4\) matrix but got \(8, 5\)"):
            rec.snapshot(epoch=1)


# ------------------------------------------------------------------------------ the switch
def test_background_is_a_bool_and_is_not_stored_in_the_run(tmp_path):
    with pytest.raises(ConfigError, match="`background`"):
        RecordConfig(background="no")
    Recorder(_model(), tmp_path / "a.h5", background=False).close()
    Recorder(_model(), tmp_path / "b.h5").close()
    configs = []
    for name in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / name, "r") as f:
            configs.append(json.loads(f.attrs["config"]))
    assert configs[0] == configs[1] and "background" not in configs[0]


def test_bstab_record_no_background(tmp_path):
    from basis_stability.cli import main

    path = tmp_path / "mlp.h5"
    args = ["record", "--model", "mlp", "--epochs", "2", "-o", str(path), "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--no-background"])
    assert result.exit_code == 0, result.output
    assert "Recorded 3 snapshots" in result.output
    assert validate_run(path).ok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_are_copied_through_pinned_buffers_bit_exactly(tmp_path):
    for background in (False, True):
        torch.manual_seed(0)
        model = Zoo().cuda()
        with Recorder(model, tmp_path / f"{background}.h5", background=background) as rec:
            for t in (1, 2):
                _perturb(model, t)
                rec.snapshot(step=t, epoch=t)
            if background:
                held = rec._buffers._held.values()
                assert held and all(tensor.is_pinned() for tensor, _, _ in held)
    assert _contents(tmp_path / "False.h5") == _contents(tmp_path / "True.h5")


# ------------------------------------------------------------------------------ SIGKILL
def test_sigkill_inside_a_background_write_loses_only_that_snapshot(tmp_path):
    """The kill comes from the writer thread, two layer rows into snapshot 5, while the training
    thread has gone on (``--no-flush``: ``done t`` once snapshot() returns)."""
    path = tmp_path / "run.h5"
    writer = Writer(path, "--die-inside", "5", "--no-flush")
    try:
        writer.wait_for("ready")
        code = writer.finish()
    finally:
        writer.stop()
    assert code == -signal.SIGKILL, writer.output()
    assert writer.last("begin") in (5, 6), writer.output()  # snapshot 6 waits for 5
    committed, rows = read_counts(path)
    assert (committed, rows) == (5, 6), "snapshots 0..4 committed, 5 half-written"
    check_snapshots(path, 5)
    assert validate_run(path).ok
    resumed = Writer(path, "--mode", "append", "--start", "5", "--count", "2", "--no-flush")
    try:
        assert resumed.wait_for("ready") == "ready 5"
        assert resumed.finish() == 0, resumed.output()
    finally:
        resumed.stop()
    check_snapshots(path, 7)


@pytest.mark.parametrize("seed", range(2))
def test_sigkill_while_training_runs_ahead_of_the_writer(tmp_path, seed):
    """A kill at a random instant of ``--no-flush`` recording: every snapshot before the last
    returned one is committed and exact; at most the ones in flight are missing."""
    path = tmp_path / "run.h5"
    delay = random.Random(seed).uniform(0.2, 0.8)
    writer = Writer(path, "--sizes", KILL_SIZES, "--interval", INTERVAL_S, "--no-flush")
    try:
        writer.wait_for("ready")
        time.sleep(delay)
        assert writer.proc.poll() is None, writer.output()
        writer.proc.send_signal(signal.SIGKILL)
        code = writer.finish()
    finally:
        writer.stop()
    committed, rows = read_counts(path)
    result = TrialResult(
        seed, delay, code, writer.last("begin"), max(writer.last("done"), 0), committed, rows
    )
    assert code == -signal.SIGKILL
    # snapshot(t) returned => t - 1 was committed; a begun t may have been committed already
    low = max(result.last_done, 1)
    high = max(result.last_begin, result.last_done) + 1
    assert low <= committed <= high, f"{committed} committed, expected {low}..{high}: {result}"
    check_snapshots(path, committed, KILL_SIZES)
    report = validate_run(path)
    assert report.ok, [str(f) for f in report.findings]
    path.unlink()
