"""Seeded fuzzing of run files: random truncations and byte flips, every CLI command on each.

    python fuzz_runs.py WORKDIR --seed S --cases N

For every damaged copy of a small run (``damage.make_run``), ``inspect``, ``validate``,
``analyze`` and ``export`` run in this process (click's CliRunner). Each must either exit 0 with
exactly the undamaged file's results (inspect's text, the analysis tables, the exported tensors)
or exit non-zero with one ``Error:`` line: never a traceback, never "Unexpected", never a number
that differs without an error. A hang shows as the caller's timeout; ``case N`` lines on stderr
say where it was. The last stdout line is a JSON summary.

A tenth of the flips are aimed at the chunks of ``/state`` (format 1.3: the biases, a small share
of the file that random flips seldom reach), whose values the export writes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from damage import make_run  # noqa: E402

TABLES = ("summary.csv", "stability.csv", "spectra.csv", "ranks.csv")


def run_all(path: Path, out: Path) -> dict[str, tuple[int, object]]:
    """``{command: (exit code, result or the error line)}`` for one run file."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from basis_stability.cli import main

    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    results = {}
    commands = {
        "inspect": ["inspect", str(path)],
        "validate": ["validate", str(path)],
        "analyze": ["analyze", str(path), "--no-plots", "--no-cache", "-o", str(out / "a")],
        "export": ["export", str(path), "-o", str(out / "x.safetensors")],
    }
    for name, args in commands.items():
        result = CliRunner().invoke(main, args)
        text = result.output.replace(str(path), "RUN")
        if result.exit_code != 0:
            results[name] = (result.exit_code, text)
        elif name == "analyze":
            results[name] = (0, {t: (out / "a" / t).read_text() for t in TABLES})
        elif name == "export":
            tensors = load_file(out / "x.safetensors")
            results[name] = (0, {k: v.tobytes().hex() for k, v in sorted(tensors.items())})
        else:
            results[name] = (0, text)
    return results


def state_chunks(path: Path) -> list[tuple[int, int]]:
    """``(byte offset, size)`` of every chunk under ``/state`` (the index and the value rows)."""
    import h5py

    with h5py.File(path, "r") as f:
        datasets = [f["state"][name] for name in f.get("state", {})]
        return [
            (info.byte_offset, info.size)
            for ds in datasets
            for info in map(ds.id.get_chunk_info, range(ds.id.get_num_chunks()))
        ]


def damage(data: bytes, rng: random.Random, targets=()) -> tuple[str, bytes]:
    kind = rng.random()
    if kind < 0.3:
        n = rng.randrange(0, len(data))
        return f"truncate to {n}", data[:n]
    out = bytearray(data)
    if targets and kind > 0.93:  # a bit of a /state chunk
        offset, size = rng.choice(targets)
        pos = offset + rng.randrange(size)
        out[pos] ^= 1 << rng.randrange(8)
        return f"flip a state bit at {pos}", bytes(out)
    flips = []
    for _ in range(rng.randint(1, 3)):
        region = 8192 if rng.random() < 0.5 else len(data)  # metadata lives near the start
        pos = rng.randrange(0, min(region, len(data)))
        out[pos] ^= 1 << rng.randrange(8)
        flips.append(pos)
    return f"flip bits at {flips}", bytes(out)


def problem(reference: dict, got: dict) -> str | None:
    for name, (code, value) in got.items():
        if code == 0:
            if value != reference[name][1]:
                return f"{name} exited 0 with results that differ from the undamaged file"
            continue
        errors = [ln for ln in value.splitlines() if "Error:" in ln]
        if "Traceback" in value or "Unexpected" in value or len(errors) != 1:
            return f"{name} exited {code} without one clear line: {value[-400:]!r}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument(
        "--crashed", action="store_true", help="leave the writer's flag set (read with SWMR)"
    )
    args = parser.parse_args()
    work = args.workdir
    clean = make_run(work / "clean.h5")
    targets = state_chunks(clean)
    if args.crashed:
        crash = "import h5py,os,sys; f=h5py.File(sys.argv[1],'r+',libver='latest'); "
        subprocess.run([sys.executable, "-c", crash + "f.swmr_mode=True; os._exit(0)", str(clean)])
    reference = run_all(clean, work / "ref-out")
    assert all(code == 0 for code, _ in reference.values()), reference
    data = clean.read_bytes()
    rng = random.Random(args.seed)
    failures, errors, slowest = [], 0, 0.0
    path = work / "damaged.h5"
    for case in range(args.cases):
        what, damaged = damage(data, rng, targets)
        path.write_bytes(damaged)
        print(f"case {case}: {what}", file=sys.stderr, flush=True)
        start = time.monotonic()
        got = run_all(path, work / "out")
        slowest = max(slowest, time.monotonic() - start)
        errors += any(code != 0 for code, _ in got.values())
        bad = problem(reference, got)
        if bad:
            failures.append(f"case {case} ({what}): {bad}")
            shutil.copyfile(path, work / f"failed-{case}.h5")  # kept to reproduce
    summary = {"cases": args.cases, "with_errors": errors, "failures": failures, "slowest": slowest}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
