"""OIALR against full-rank training on four built-in tasks, and the choice of our defaults.

Every run is ``run_train_job`` (what ``bstab train`` runs: recorder on, one snapshot per epoch),
with the same epochs, optimizer (AdamW) and seeds across variants. Tasks:

- ``cnn/digits``      30 epochs;
- ``vit-tiny/digits`` 30 epochs, 3 epochs of warm-up, then cosine decay (the paper's recipe);
- ``cnn/mnist1d``     60 epochs;
- ``forecaster/co2``  40 epochs, reported by validation MSE (standardised units).

Variants: ``full`` (full-rank); ``reference`` (``--preset reference``: the authors' code rank
for rank, delay = training / 6, interval 5 epochs, beta 0.15); ``fixed`` (our preset, same
delay, interval and beta); ``auto`` (our auto mode: delay and beta from the measured stability
and spectra).

Part (a) prints, per task and variant: mean ± sd of the headline metric over seeds, trainable
share of the factorised layers and of the model at the end, ranks at the end (seed 0, the
layers kept dense marked ``D``), training time ÷ full-rank (median of same-seed ratios),
exported parameters ÷ dense and CPU inference time ÷ dense (batch 256). Targets for auto:
within 0.5 points of full-rank (MSE <= 1.02 x) at <= 20 % of the factorised parameters; on the
forecaster <= 10 % of the model trainable; never worse than the reference preset at no larger
share; no exported model larger than dense.

Part (b) measures each of our default's choices against its alternative on cnn/digits and
vit-tiny/digits (``fixed`` settings with ``--ablation-beta``, default 0.15; same seeds): first
cut at conversion vs one interval later,
progressive vs all-at-once updates, keep_last, ``reset`` vs ``restart`` (Adam's step zeroed too),
the halving cap's rounding (ceil vs floor), and keeping a layer dense while its factors would
not pay vs factorising it anyway.

    python benchmarks/oialr_vs_full.py [--seeds 3] [--parts ab] [--tasks cnn-digits,...]
        [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from basis_stability.jobs import TrainJob, TrainResult, run_train_job
from basis_stability.training import TrainConfig

ACC_GAP = 0.005  # 0.5 accuracy points
MSE_RATIO = 1.02
FACTORISED_SHARE = 0.20
FORECASTER_MODEL_SHARE = 0.10


@dataclass(frozen=True)
class Task:
    name: str
    model: str
    dataset: str
    epochs: int
    warmup: float = 0.0
    lr_schedule: str = "constant"

    @property
    def regression(self) -> bool:
        return self.dataset == "co2"


TASKS = {
    t.name: t
    for t in (
        Task("cnn-digits", "cnn", "digits", 30),
        Task("vit-digits", "vit-tiny", "digits", 30, warmup=3, lr_schedule="cosine"),
        Task("cnn-mnist1d", "cnn", "mnist1d", 60),
        Task("forecaster-co2", "forecaster", "co2", 40),
    )
}

VARIANTS = ("full", "reference", "fixed", "auto")

# part (b): each choice of our default against its alternative (OIALRConfig fields)
ABLATIONS = {
    "default": {},
    "cut one interval later": {"first_cut": "one_interval_later"},
    "progressive 0.1": {"progressive": 0.1},
    "keep_last": {"keep_last": True},
    "restart step": {"moments": "restart"},
    "floor cap": {"cap_rounding": "floor"},
    "factorise when larger": {"dense_when_larger": False},
}


@dataclass
class Outcome:
    metric: float
    share: float
    fact: float
    seconds: float
    ranks: dict[str, int] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    params_ratio: float = 1.0
    infer_ratio: float = 1.0
    converted: bool = True
    larger: bool = False  # an exported model bigger than dense


CACHE: dict[tuple, Outcome] = {}


def run(
    folder: Path,
    task: Task,
    seed: int,
    variant: str,
    extra: dict | None = None,
    beta: float = 0.15,
) -> Outcome:
    """One training run (cached: the same settings are trained once)."""
    extra = dict(extra or {})
    key = (task.name, seed, variant, beta, tuple(sorted(extra.items())))
    if key in CACHE:
        return CACHE[key]
    keep_last = extra.pop("keep_last", None)
    train = TrainConfig(
        epochs=task.epochs, seed=seed, warmup=task.warmup, lr_schedule=task.lr_schedule
    )
    job = TrainJob(
        model=task.model,
        dataset=task.dataset,
        train=train,
        mode="full" if variant == "full" else "oialr",
        delay=None if variant in ("full", "auto") else f"{task.epochs / 6:g}",
        beta=beta if variant in ("reference", "fixed") else None,
        preset="reference" if variant == "reference" else "bstab",
        keep_last=keep_last,
        auto=variant == "auto" if variant != "full" else None,
        overrides=extra or None,
    )
    run_path, export_path = folder / "run.h5", folder / "export.pt"
    result: TrainResult = run_train_job(job, run_path, export_path, progress=False)
    run_path.unlink(missing_ok=True)
    export_path.unlink(missing_ok=True)
    rep = result.export
    out = Outcome(
        metric=result.metric[1],
        share=result.trainable_share,
        fact=result.factorised_share,
        seconds=result.seconds,
        ranks=dict(result.ranks),
        dense=list(result.dense_layers),
        params_ratio=rep.params_factorized / rep.params_dense if rep else 1.0,
        infer_ratio=rep.ms_factorized / rep.ms_dense if rep else 1.0,
        converted=result.never_converted is None,
        larger=bool(rep)
        and (rep.params_factorized > rep.params_dense or rep.macs_factorized > rep.macs_dense),
    )
    CACHE[key] = out
    label = variant + (f" {extra}" if extra else "") + (" keep_last" if keep_last else "")
    label += f" beta {beta:g}" if variant in ("reference", "fixed") else ""
    print(
        f"  {task.name:<15s} seed {seed} {label:<34s} {result.metric[0]} {out.metric:.5f} "
        f"share {out.share:.3f} fact {out.fact:.3f} {out.seconds:6.1f} s"
        + ("" if out.converted else "  (never converted)"),
        flush=True,
    )
    return out


def mean_sd(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def fmt_ranks(outcome: Outcome) -> str:
    parts = [str(k) for k in outcome.ranks.values()] + ["D"] * len(outcome.dense)
    return "/".join(parts) or "-"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def part_a(folder: Path, tasks: list[Task], seeds: list[int]) -> list[str]:
    rows, verdicts = [], []
    for task in tasks:
        outcomes = {v: [run(folder, task, s, v) for s in seeds] for v in VARIANTS}
        full = outcomes["full"]
        for variant in VARIANTS:
            got = outcomes[variant]
            ratio = statistics.median(o.seconds / f.seconds for o, f in zip(got, full))
            rows.append(
                (
                    task.name,
                    variant,
                    mean_sd([o.metric for o in got], 5 if task.regression else 4),
                    f"{statistics.fmean(o.fact for o in got):.3f}",
                    f"{statistics.fmean(o.share for o in got):.3f}",
                    fmt_ranks(got[0]),
                    f"{ratio:.2f}",
                    f"{statistics.fmean(o.params_ratio for o in got):.3f}",
                    f"{statistics.median(o.infer_ratio for o in got):.2f}",
                    f"{sum(not o.converted for o in got)}/{len(got)}",
                )
            )
        auto, ref = outcomes["auto"], outcomes["reference"]
        m_full = statistics.fmean(o.metric for o in full)
        m_auto = statistics.fmean(o.metric for o in auto)
        m_ref = statistics.fmean(o.metric for o in ref)
        fact = statistics.fmean(o.fact for o in auto)
        share = statistics.fmean(o.share for o in auto)
        if task.regression:
            close = m_auto <= MSE_RATIO * m_full
            closeness = f"MSE auto/full {m_auto / m_full:.3f} (<= {MSE_RATIO})"
            better = m_auto <= m_ref
        else:
            close = m_auto >= m_full - ACC_GAP
            closeness = f"acc auto - full {100 * (m_auto - m_full):+.2f} points (>= -0.5)"
            better = m_auto >= m_ref
        ref_share = statistics.fmean(o.share for o in ref)
        verdicts += [
            f"{task.name}: {closeness}: {verdict(close)}",
            f"{task.name}: auto factorised share {fact:.3f} (<= {FACTORISED_SHARE}): "
            f"{verdict(fact <= FACTORISED_SHARE)}",
            f"{task.name}: auto vs reference: metric {m_auto:.4f} vs {m_ref:.4f}, model share "
            f"{share:.3f} vs {ref_share:.3f}: {verdict(better and share <= ref_share + 1e-9)}",
        ]
        if task.regression:
            verdicts.append(
                f"{task.name}: auto model share {share:.3f} (<= {FORECASTER_MODEL_SHARE}): "
                f"{verdict(share <= FORECASTER_MODEL_SHARE)}"
            )
        larger = [v for v in VARIANTS for o in outcomes[v] if o.larger]
        verdicts.append(f"{task.name}: no exported model larger than dense: {verdict(not larger)}")
    header = (
        "task", "variant", "metric (mean ± sd)", "fact share", "model share", "ranks (seed 0)",
        "time/full", "export params/dense", "inference/dense", "never conv.",
    )  # fmt: skip
    table(header, rows)
    return verdicts


def part_b(folder: Path, tasks: list[Task], seeds: list[int], beta: float) -> None:
    rows = []
    for task in tasks:
        for label, extra in ABLATIONS.items():
            got = [run(folder, task, s, "fixed", extra, beta) for s in seeds]
            rows.append(
                (
                    task.name,
                    label,
                    mean_sd([o.metric for o in got]),
                    f"{statistics.fmean(o.fact for o in got):.3f}",
                    f"{statistics.fmean(o.share for o in got):.3f}",
                    fmt_ranks(got[0]),
                )
            )
    table(("task", "choice", "metric (mean ± sd)", "fact share", "model share", "ranks"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--parts", default="ab", help="any of a, b (default ab)")
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"part (a) tasks (default {','.join(TASKS)})"
    )
    parser.add_argument("--ablation-tasks", default="cnn-digits,vit-digits", help="part (b) tasks")
    parser.add_argument(
        "--ablation-beta", type=float, default=0.15, help="part (b) beta (default 0.15)"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 epochs: a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))

    def chosen(names: str) -> list[Task]:
        unknown = [n for n in names.split(",") if n not in TASKS]
        if unknown:
            sys.exit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
        tasks = [TASKS[n] for n in names.split(",")]
        if args.quick:
            tasks = [
                Task(t.name, t.model, t.dataset, 6, min(t.warmup, 1), t.lr_schedule) for t in tasks
            ]
        return tasks

    began = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {seeds}")
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "a" in args.parts:
            print("\n(a) full-rank vs the reference preset vs our fixed and auto OIALR")
            verdicts = part_a(folder, chosen(args.tasks), seeds)
        if "b" in args.parts:
            print(
                "\n(b) our default's choices, each against its alternative (fixed settings, "
                f"beta {args.ablation_beta:g})"
            )
            part_b(folder, chosen(args.ablation_tasks), seeds, args.ablation_beta)
    if verdicts:
        print()
        print("\n".join(verdicts))
    if args.quick:
        print("\n--quick: one seed and 6 epochs; the numbers mean nothing.")
    print(f"\nall runs: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
