"""OIALR against full-rank training on the built-in models: accuracy, size, time (SPEC §5).

Every run is ``run_train_job`` (what ``bstab train`` runs: recorder on, one snapshot per epoch)
with the same epochs, optimizer (AdamW default) and seeds. Variants:

- ``full``:  ordinary full-rank training.
- ``fixed``: OIALR with reference-like settings: delay = epochs / 6, interval 5 epochs, beta 0.15.
- ``auto``:  OIALR auto mode (no delay, no beta: both chosen from the measured stability/spectra).

Parts:

(a) ``cnn`` and ``vit-tiny`` on digits, ``cnn`` on mnist1d: mean ± sd final val accuracy, trainable
    share of the whole model and of the factorised layers, training wall time ÷ full-rank (median
    over seeds of the same-seed ratios; runs of one seed are back to back) and CPU inference time
    of the exported factorised model ÷ the dense model (``ExportReport.speedup``, batch 256).
(b) A (delay, beta) grid on the digits cnn (same seeds); where auto lands relative to the grid's
    accuracy / trainable-share front (the best grid accuracy at a trainable share <= auto's).
(c) The optimizer-moment policies (slice, reset, rotate) on the digits cnn, fixed settings.

Targets (PASS/MISS): accuracy within 0.5 points of full-rank at <= 20% trainable share of the
factorised layers; training wall time <= 1.15 x full-rank; auto within 0.5 points of the best
grid point at no larger trainable share; exported inference >= 1.3 x faster than dense for the
most compressed model. Run it on a quiet machine: the wall-time ratios are sensitive to load.

    python benchmarks/oialr_vs_full.py [--seeds 3] [--epochs N] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from basis_stability.jobs import TrainJob, TrainResult, run_train_job
from basis_stability.train import TrainConfig

ACC_GAP = 0.005  # 0.5 accuracy points
FACTORISED_SHARE = 0.20
TIME_RATIO = 1.15
SPEEDUP = 1.3
DEFAULT_POLICY = TrainJob().moments  # the package default is what the variants measure
POLICIES = (DEFAULT_POLICY, *(p for p in ("reset", "slice", "rotate") if p != DEFAULT_POLICY))

RESULTS: dict[tuple, TrainResult] = {}


def run(
    folder: Path,
    model: str,
    dataset: str,
    epochs: int,
    seed: int,
    variant: str,
    interval: int,
    delay: float | None = None,
    beta: float | None = None,
    moments: str = DEFAULT_POLICY,
) -> TrainResult:
    """One training run (cached: the same settings are trained once)."""
    key = (model, dataset, epochs, seed, variant, interval, delay, beta, moments)
    if key in RESULTS:
        return RESULTS[key]
    job = TrainJob(
        model,
        dataset,
        TrainConfig(epochs=epochs, seed=seed),
        mode="full" if variant == "full" else "oialr",
        delay=None if delay is None else f"{delay:g}",
        interval=str(interval),
        beta=beta,
        moments=moments,
    )
    run_path, export_path = folder / "run.h5", folder / "export.pt"
    start = time.perf_counter()
    result = run_train_job(job, run_path, export_path, progress=False)
    total = time.perf_counter() - start
    run_path.unlink(missing_ok=True)
    export_path.unlink(missing_ok=True)
    RESULTS[key] = result
    chosen = ""
    if variant == "auto":
        conv = next((e for e in result.events if e["event"] == "convert"), None)
        chosen = (
            f"  auto: convert at step {conv['step']}, beta {conv['beta']}"
            if conv
            else "  auto: never converted"
        )
    speed = f"  export x{result.export.speedup:.2f}" if result.export else ""
    print(
        f"  {model:<8s} {dataset:<7s} seed {seed} {variant:<6s} "
        f"delay {'-' if delay is None else f'{delay:g}':>4s} "
        f"beta {'-' if beta is None else f'{beta:g}':>4s} {moments:<6s} "
        f"acc {result.history[-1]['val_acc']:.4f} train {result.seconds:6.1f} s "
        f"(job {total:6.1f} s) share {result.trainable_share:.3f} "
        f"fact {result.factorised_share:.3f}{speed}{chosen}",
        flush=True,
    )
    return result


def acc(r: TrainResult) -> float:
    return r.history[-1]["val_acc"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="digits epochs (default 30)")
    parser.add_argument(
        "--mnist1d-epochs", type=int, default=None, help="mnist1d epochs (default 20)"
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds, few epochs, tiny grid")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument(
        "--parts", default="abc", help="which parts to run: any of a, b, c (default abc)"
    )
    parser.add_argument(
        "--no-vit", action="store_true", help="part (a) without vit-tiny (the slowest model)"
    )
    args = parser.parse_args()
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    epochs = args.epochs or (6 if args.quick else 30)
    m1_epochs = args.mnist1d_epochs or (4 if args.quick else 20)
    interval = 1 if args.quick else 5
    grid_delays = (1, 3) if args.quick else (3, 7, 12)
    grid_betas = (0.15, 0.25) if args.quick else (0.1, 0.15, 0.25)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [
        ("cnn", "digits", epochs),
        ("vit-tiny", "digits", epochs),
        ("cnn", "mnist1d", m1_epochs),
    ]
    if args.no_vit:
        cases = [c for c in cases if c[0] != "vit-tiny"]
    print(
        f"seeds {seeds}, epochs digits {epochs} / mnist1d {m1_epochs}, interval {interval} "
        f"epochs, AdamW, {torch.get_num_threads()} torch threads, parts {args.parts}"
    )
    began = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bstab-oialr-") as tmp:
        folder = Path(tmp)
        run(folder, "cnn", "digits", 1, 99, "full", interval)  # first-call costs off the clock

        def variants(model: str, dataset: str, n_epochs: int, seed: int) -> dict:
            fixed_delay = round(n_epochs / 6, 2)
            return {
                "full": run(folder, model, dataset, n_epochs, seed, "full", interval),
                "fixed": run(
                    folder, model, dataset, n_epochs, seed, "fixed", interval, fixed_delay, 0.15
                ),
                "auto": run(folder, model, dataset, n_epochs, seed, "auto", interval),
            }

        # ------------------------------------------------------------ (a)
        part_a: dict[tuple[str, str], dict[str, list[TrainResult]]] = {}
        if "a" in args.parts:
            print("\n(a) full-rank vs OIALR fixed vs OIALR auto")
            for model, dataset, n_epochs in cases:
                by_variant: dict[str, list[TrainResult]] = {"full": [], "fixed": [], "auto": []}
                for seed in seeds:
                    for name, r in variants(model, dataset, n_epochs, seed).items():
                        by_variant[name].append(r)
                part_a[(model, dataset)] = by_variant

        # ------------------------------------------------------------ (b)
        grid: dict[tuple[float, float], list[TrainResult]] = {}
        auto_cnn: list[TrainResult] = []
        if "b" in args.parts:
            print("\n(b) (delay, beta) grid on the digits cnn")
            for seed in seeds:
                auto_cnn.append(variants("cnn", "digits", epochs, seed)["auto"])
                for d in grid_delays:
                    for b in grid_betas:
                        r = run(folder, "cnn", "digits", epochs, seed, "grid", interval, d, b)
                        grid.setdefault((d, b), []).append(r)

        # ------------------------------------------------------------ (c)
        policies: dict[str, list[TrainResult]] = {}
        if "c" in args.parts:
            print("\n(c) moment policies on the digits cnn (fixed settings)")
            fixed_delay = round(epochs / 6, 2)
            for seed in seeds:
                for policy in POLICIES:
                    variant = "fixed" if policy == DEFAULT_POLICY else "policy"
                    r = run(
                        folder, "cnn", "digits", epochs, seed, variant, interval, fixed_delay,
                        0.15, policy,
                    )  # fmt: skip
                    policies.setdefault(policy, []).append(r)

    print(f"\nall runs: {time.perf_counter() - began:.0f} s")

    # ---------------------------------------------------------------- report (a)
    most_compressed: tuple[float, str, float] | None = None
    if part_a:
        rows = []
        for (model, dataset), by_variant in part_a.items():
            full = by_variant["full"]
            full_acc = statistics.fmean(acc(r) for r in full)
            for name, results in by_variant.items():
                m, sd = mean_sd([acc(r) for r in results])
                share = statistics.fmean(r.trainable_share for r in results)
                fact = statistics.fmean(r.factorised_share for r in results)
                ratio = statistics.median(r.seconds / f.seconds for r, f in zip(results, full))
                if name == "full":
                    rows.append(
                        (
                            f"{model}/{dataset}",
                            name,
                            f"{m:.4f} ± {sd:.4f}",
                            "",
                            "1.000",
                            "1.000",
                            f"{ratio:.2f}",
                            "",
                            "",
                            "",
                            "",
                        )  # fmt: skip
                    )
                    continue
                speed = statistics.median(r.export.speedup for r in results)
                label = f"{model}/{dataset} {name}"
                if most_compressed is None or share < most_compressed[0]:
                    most_compressed = (share, label, speed)
                acc_ok = m >= full_acc - ACC_GAP and fact <= FACTORISED_SHARE
                rows.append(
                    (
                        f"{model}/{dataset}",
                        name,
                        f"{m:.4f} ± {sd:.4f}",
                        f"{100 * (m - full_acc):+.2f}",
                        f"{share:.3f}",
                        f"{fact:.3f}",
                        f"{ratio:.2f}",
                        f"{speed:.2f}",
                        verdict(acc_ok),
                        verdict(ratio <= TIME_RATIO),
                        "",
                    )
                )
        table(
            (
                "model/data",
                "variant",
                "val_acc mean ± sd",
                "Δ pts",
                "train share",
                "fact share",
                "time ÷ full",
                "infer ×",
                "acc@≤20%",
                "time≤1.15",
                "",
            ),
            rows,
        )
        print(
            "\n  Δ pts: accuracy minus full-rank's, in points; train share: trainable params "
            "/ full model's; fact share: sum k² / sum m·n of the factorised layers;\n  time ÷ "
            "full: median over seeds of training seconds ÷ the same seed's full-rank seconds; "
            "infer ×: dense ms ÷ exported ms (median over seeds)."
        )

    # ---------------------------------------------------------------- report (b)
    auto_ok: bool | None = None
    if grid:
        rows = []
        auto_acc, auto_sd = mean_sd([acc(r) for r in auto_cnn])
        auto_share = statistics.fmean(r.trainable_share for r in auto_cnn)
        points = []
        for (d, b), results in sorted(grid.items()):
            m, sd = mean_sd([acc(r) for r in results])
            share = statistics.fmean(r.trainable_share for r in results)
            fact = statistics.fmean(r.factorised_share for r in results)
            points.append((d, b, m, share))
            rows.append((f"{d:g}", f"{b:g}", f"{m:.4f} ± {sd:.4f}", f"{share:.3f}", f"{fact:.3f}"))
        auto_fact = statistics.fmean(r.factorised_share for r in auto_cnn)
        decisions = []
        for r in auto_cnn:
            conv = next((e for e in r.events if e["event"] == "convert"), None)
            decisions.append(f"{conv['step']}/{conv['beta']}" if conv else "never")
        rows.append(
            (
                "auto",
                ",".join(decisions),
                f"{auto_acc:.4f} ± {auto_sd:.4f}",
                f"{auto_share:.3f}",
                f"{auto_fact:.3f}",
            )
        )
        table(("delay (ep)", "beta", "val_acc mean ± sd", "train share", "fact share"), rows)
        print("  (auto's 'beta' column: conversion step / chosen beta, per seed)")
        front = [p for p in points if p[3] <= auto_share]
        if front:
            best = max(front, key=lambda p: p[2])
            auto_ok = auto_acc >= best[2] - ACC_GAP
            print(
                f"\n  best grid point at train share <= auto's {auto_share:.3f}: "
                f"delay {best[0]:g}, "
                f"beta {best[1]:g}: acc {best[2]:.4f} (share {best[3]:.3f}); auto {auto_acc:.4f} "
                f"({100 * (auto_acc - best[2]):+.2f} pts)"
            )
        else:
            print(f"\n  no grid point is as small as auto (share {auto_share:.3f})")
        overall = max(points, key=lambda p: p[2])
        print(
            f"  best grid point overall: delay {overall[0]:g}, beta {overall[1]:g}: acc "
            f"{overall[2]:.4f} at share {overall[3]:.3f}"
        )

    # ---------------------------------------------------------------- report (c)
    if policies:
        rows = []
        for policy, results in policies.items():
            m, sd = mean_sd([acc(r) for r in results])
            per_seed = " ".join(f"{acc(r):.4f}" for r in results)
            share = statistics.fmean(r.trainable_share for r in results)
            rows.append((policy, f"{m:.4f} ± {sd:.4f}", per_seed, f"{share:.3f}"))
        table(("moments", "val_acc mean ± sd", "per seed", "train share"), rows)

    # ---------------------------------------------------------------- targets
    rows = []
    if part_a:
        for (model, dataset), by_variant in part_a.items():
            full_acc = statistics.fmean(acc(r) for r in by_variant["full"])
            for name in ("fixed", "auto"):
                res = by_variant[name]
                m = statistics.fmean(acc(r) for r in res)
                fact = statistics.fmean(r.factorised_share for r in res)
                ratio = statistics.median(
                    r.seconds / f.seconds for r, f in zip(res, by_variant["full"])
                )
                rows.append(
                    (
                        f"accuracy {model}/{dataset} {name}",
                        f"{100 * (m - full_acc):+.2f} pts @ fact {fact:.3f}",
                        ">= -0.50 pts @ <= 0.20",
                        verdict(m >= full_acc - ACC_GAP and fact <= FACTORISED_SHARE),
                    )
                )
                rows.append(
                    (
                        f"train time {model}/{dataset} {name}",
                        f"{ratio:.2f} x full",
                        f"<= {TIME_RATIO:.2f}",
                        verdict(ratio <= TIME_RATIO),
                    )
                )
    if grid:
        rows.append(("auto vs grid front (cnn/digits)", "see (b)", "<= 0.50 pts below", ""))
        rows[-1] = (*rows[-1][:3], verdict(auto_ok))
    if most_compressed is not None:
        share, label, speed = most_compressed
        rows.append(
            (
                f"export speedup, most compressed ({label}, share {share:.3f})",
                f"{speed:.2f} x",
                f">= {SPEEDUP:.1f}",
                verdict(speed >= SPEEDUP),
            )
        )
    if rows:
        table(("target", "value", "target", "result"), rows)
    if args.quick:
        print("\n--quick: too few seeds and epochs for the numbers to mean anything.")


if __name__ == "__main__":
    sys.exit(main())
