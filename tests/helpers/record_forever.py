"""Record deterministic snapshots of a small model until killed (or ``--count`` snapshots).

Snapshot ``t`` holds, in layer ``i``, every weight equal to ``float32(t + i / 10)`` and every
bias (stored in ``/state``, format 1.3) equal to ``float32(t + i / 10 + 0.05)``, with
``step = t``, ``epoch = t`` and the metric ``t = t``; so a reader can check every committed
snapshot exactly, its state included. Run by the crash and SWMR tests (and
``benchmarks/crash_soak.py``)::

    python record_forever.py RUN.h5 [--sizes 512,512,384,256] [--count N] [--interval S]
    python record_forever.py RUN.h5 --mode append --start K --count N
    python record_forever.py RUN.h5 --die-inside T   # SIGKILL itself halfway through snapshot T
    python record_forever.py RUN.h5 --die-before-state T   # SIGKILL after T's layer rows
    python record_forever.py RUN.h5 --die-before-commit T  # SIGKILL once T's rows are all written
    python record_forever.py RUN.h5 --count N --hold # after N snapshots, wait for a stdin line
    python record_forever.py RUN.h5 --no-flush       # say `done t` once snapshot() returns

The recorder writes in the background (its default): ``snapshot()`` returns once the weights are
copied, and ``rec.flush()`` waits for the commit. The kills above come from inside the writer
(on its background thread), so they land in the middle of a real background write.

Protocol on stdout (one line each, flushed):

    ready N     the run is open; N snapshots are in the file (create: the initial snapshot 0)
    begin t     snapshot t is about to be written
    done t      snapshot t returned and rec.flush() returned (it is committed); with
                --no-flush: snapshot() returned (t is copied; t - 1 is committed)
    holding     (--hold) all snapshots written; the file stays open until a line on stdin
    closed      the recorder was closed
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from torch import nn

DEFAULT_SIZES = "512,512,512,384,256"  # four Linear layers, ~3.1 MB of float32 per snapshot


def build_model(sizes: str) -> nn.Sequential:
    dims = [int(s) for s in sizes.split(",")]
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])))


def layer_value(t: int, i: int) -> float:
    """What every weight of layer ``i`` holds in snapshot ``t`` (before float32 rounding)."""
    return t + i / 10


def bias_value(t: int, i: int) -> float:
    """What every bias entry of layer ``i`` holds in snapshot ``t`` (before float32 rounding)."""
    return t + i / 10 + 0.05


@torch.no_grad()
def set_weights(model: nn.Sequential, t: int) -> None:
    for i, layer in enumerate(model):
        layer.weight.fill_(layer_value(t, i))
        layer.bias.fill_(bias_value(t, i))


def say(line: str) -> None:
    print(line, flush=True)


def die_inside(rec, snapshot: int, after_layers: int = 2) -> None:
    """Make ``rec`` SIGKILL its own process inside snapshot ``snapshot``.

    The kill comes from the writer (the thread that writes), after ``after_layers`` layer rows
    were written and flushed, so the half-written rows are on disk.
    """
    writer = rec._writer
    append = writer.append

    def dying_append(matrices, **kwargs):
        t = writer.n_snapshots  # the index of the snapshot being written

        def dying_matrices():
            for i, mat in enumerate(matrices):
                if t == snapshot and i == after_layers:
                    writer._f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                yield mat

        return append(dying_matrices(), **kwargs)

    writer.append = dying_append


def die_around_state(rec, snapshot: int, before: bool) -> None:
    """Make ``rec`` SIGKILL its own process in snapshot ``snapshot``, with what is written so far
    flushed: right before its state rows (every layer row written), or right after them (just
    before the commit, ``/snapshots`` grown)."""
    writer = rec._writer
    write_state = writer._write_state

    def die() -> None:
        writer._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def dying_write_state(t, state):
        if t == snapshot and before:
            die()
        write_state(t, state)
        if t == snapshot:
            die()

    writer._write_state = dying_write_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--mode", choices=("create", "append"), default="create")
    parser.add_argument("--start", type=int, default=1, help="first t written by the loop")
    parser.add_argument("--count", type=int, default=0, help="snapshots to write; 0: forever")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between snapshots")
    parser.add_argument("--die-inside", type=int, default=-1, help="SIGKILL inside snapshot T")
    parser.add_argument(
        "--die-before-state", type=int, default=-1, help="SIGKILL before snapshot T's state"
    )
    parser.add_argument(
        "--die-before-commit", type=int, default=-1, help="SIGKILL before snapshot T's commit"
    )
    parser.add_argument("--hold", action="store_true", help="stay open until a line on stdin")
    parser.add_argument(
        "--no-flush", action="store_true", help="say `done t` before snapshot t is committed"
    )
    args = parser.parse_args()

    from basis_stability import Recorder

    model = build_model(args.sizes)
    set_weights(model, 0)  # the initial snapshot (create mode) is snapshot 0
    rec = Recorder(model, args.path, mode=args.mode)
    if args.die_inside >= 0:
        die_inside(rec, args.die_inside)
    for snapshot, before in ((args.die_before_state, True), (args.die_before_commit, False)):
        if snapshot >= 0:
            die_around_state(rec, snapshot, before)
    say(f"ready {rec.n_snapshots}")
    t = args.start
    while args.count == 0 or t < args.start + args.count:
        if args.interval:
            time.sleep(args.interval)
        set_weights(model, t)
        say(f"begin {t}")
        rec.snapshot(step=t, epoch=t, metrics={"t": t})
        if not args.no_flush:
            rec.flush()
        say(f"done {t}")
        t += 1
    if args.hold:
        say("holding")
        sys.stdin.readline()
    rec.close()
    say("closed")


if __name__ == "__main__":
    main()
