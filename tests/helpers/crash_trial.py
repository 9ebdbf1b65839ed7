"""Drive ``record_forever.py`` in a real subprocess, SIGKILL it, and check what it left.

Shared by ``tests/test_crash.py``, ``tests/test_swmr.py`` and ``benchmarks/crash_soak.py``.
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

HELPER = Path(__file__).with_name("record_forever.py")
sys.path.insert(0, str(HELPER.parent))
from record_forever import DEFAULT_SIZES, bias_value, layer_value  # noqa: E402

START_TIMEOUT_S = 120.0  # importing torch on a busy 2-core machine can take a while


class Writer:
    """A running ``record_forever.py``; a thread collects its output lines.

    stderr is merged into stdout so that a traceback shows up in failure messages.
    """

    def __init__(self, path: Path, *args: str) -> None:
        cmd = [sys.executable, str(HELPER), str(path), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # EOF

    def wait_for(self, prefix: str, timeout: float = START_TIMEOUT_S) -> str:
        """Block until the writer prints a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"writer printed no {prefix!r} in {timeout} s") from None
            if line is None:
                raise RuntimeError(f"writer exited before {prefix!r}:\n{self.output()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def release(self) -> None:
        """Let a ``--hold`` writer close its run and exit."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the process and for EOF on its output; returns the exit code."""
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs; safe in ``finally``."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self._thread.join(timeout=60)  # EOF follows the exit; then the pipes can be closed
        self.proc.stdout.close()
        self.proc.stdin.close()

    def output(self) -> str:
        return "\n".join(self.lines[-20:])

    def last(self, word: str) -> int:
        """The ``t`` of the last ``word t`` line, -1 if none."""
        ts = [int(line.split()[1]) for line in self.lines if line.startswith(f"{word} ")]
        return ts[-1] if ts else -1


@dataclass
class TrialResult:
    """What one SIGKILL trial saw: the writer's last words and the file's state."""

    seed: int
    delay_s: float
    returncode: int
    last_begin: int  # -1: no snapshot begun after the initial one
    last_done: int  # 0: only the initial snapshot (ready)
    committed: int  # len(/snapshots) read back with open_run
    rows_on_disk: int  # most rows any layer dataset holds (> committed: a half-written row)
    output: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> bool:
        return self.last_begin > self.last_done

    @property
    def kill_point(self) -> str:
        if not self.in_flight:
            return "between snapshots"
        if self.committed == self.last_begin + 1:
            return "in snapshot, after its commit"
        if self.rows_on_disk > self.committed:
            return "in snapshot, not committed, partial rows visible"
        return "in snapshot, not committed, no rows visible"


# A short pause between snapshots keeps trial files to a few hundred MB (a free-running writer
# reaches ~1.4 GB in 1.5 s) while about half of the kills still land inside a snapshot.
INTERVAL_S = "0.004"


def kill_trial(
    path: Path, seed: int, delay: tuple[float, float] = (0.2, 1.0), sizes: str = DEFAULT_SIZES
) -> TrialResult:
    """Record into ``path`` in a subprocess and SIGKILL it a seeded random time after ``ready``."""
    delay_s = random.Random(seed).uniform(*delay)
    writer = Writer(path, "--sizes", sizes, "--interval", INTERVAL_S)
    try:
        writer.wait_for("ready")
        time.sleep(delay_s)
        if writer.proc.poll() is not None:
            raise RuntimeError(f"writer died before the kill:\n{writer.output()}")
        writer.proc.send_signal(signal.SIGKILL)
        code = writer.finish()
    finally:
        writer.stop()
    committed, rows = read_counts(path)
    return TrialResult(
        seed=seed,
        delay_s=delay_s,
        returncode=code,
        last_begin=writer.last("begin"),
        last_done=max(writer.last("done"), 0),
        committed=committed,
        rows_on_disk=rows,
        output=writer.lines,
    )


def read_counts(path: Path) -> tuple[int, int]:
    """``(committed snapshots per open_run, most rows of any layer dataset)``."""
    from basis_stability import open_run

    with open_run(path) as run:
        committed = run.n_snapshots
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        rows = max(ds.shape[0] for ds in f["layers"].values())
    return committed, rows


def verify_trial(result: TrialResult, path: Path, sizes: str = DEFAULT_SIZES) -> None:
    """Assert the SIGKILL invariants of one trial; raises AssertionError with the story."""
    story = f"seed {result.seed}, kill after {result.delay_s:.3f} s: " + "; ".join(
        result.output[-4:]
    )
    assert result.returncode == -signal.SIGKILL, f"writer was not killed by SIGKILL: {story}"
    low = result.last_done + 1  # the initial snapshot 0 plus every `done t`
    high = low + 1 if result.in_flight else low  # the one in flight may have committed too
    assert low <= result.committed <= high, (
        f"expected {low}..{high} committed snapshots but the file has {result.committed}: {story}"
    )
    check_snapshots(path, result.committed, sizes)
    from basis_stability.store.validate import validate_run

    report = validate_run(path)
    assert report.ok, f"validate_run rejects the killed run: {report.findings}: {story}"


def check_snapshots(path: Path, n: int, sizes: str = DEFAULT_SIZES, first_metric: int = 1) -> None:
    """Assert the run at ``path`` holds exactly ``n`` snapshots, each with its exact values.

    ``first_metric``: the first snapshot that logged the metric ``t`` (the initial one logs none).
    """
    from basis_stability import open_run

    with open_run(path) as run:
        assert run.n_snapshots == n, f"expected {n} snapshots, found {run.n_snapshots}"
        check_open_run(run, range(n), sizes, first_metric)


def check_open_run(run, ts, sizes: str = DEFAULT_SIZES, first_metric: int = 1) -> None:
    """Assert snapshots ``ts`` of an open run: weights, biases (the state each committed
    snapshot must hold), step, epoch and metric ``t``."""
    dims = [int(s) for s in sizes.split(",")]
    shapes = [(max(a, b), min(a, b)) for a, b in zip(dims[:-1], dims[1:])]
    assert [(info.name, info.shape) for info in run.layers] == [
        (str(i), shape) for i, shape in enumerate(shapes)
    ]
    assert run.state_keys == [f"{i}.bias" for i in range(len(shapes))]
    ts = list(ts)
    steps, epochs = run.steps, run.epochs
    metrics = run.metrics_array()
    names = run.metric_names
    for t in ts:
        assert steps[t] == t and epochs[t] == t, f"snapshot {t}: step {steps[t]}, epoch {epochs[t]}"
        if t >= first_metric:
            assert metrics[t, names.index("t")] == t, f"snapshot {t}: metric {metrics[t]}"
        for i, info in enumerate(run.layers):
            mat = run.layer(info.name)[t]
            want = np.float32(layer_value(t, i))
            bad = np.count_nonzero(mat != want)
            assert bad == 0, (
                f"snapshot {t}, layer {info.name}: {bad} of {mat.size} values differ from "
                f"{want} (e.g. {mat.ravel()[np.argmax(mat.ravel() != want)]})"
            )
        state = run.state(t)
        for i in range(len(shapes)):
            bias, want = state[f"{i}.bias"], np.float32(bias_value(t, i))
            assert bias.shape == (dims[i + 1],) and bias.dtype == np.float32
            assert np.count_nonzero(bias != want) == 0, f"snapshot {t}: bias {i} is {bias[:3]}"
