"""``analyze(path)``: tidy tables of stability, overlap, spectra and ranks, plus the OIALR plan.

Example:
    >>> report = analyze("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
    >>> report.summary[["layer", "final_S", "stable_from_epoch"]]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import _dist
from ..errors import ConfigError, RunFileError, expected
from ..recommend import (
    Interval,
    Plan,
    PlanConfig,
    excluded_layers_note,
    excluded_notes,
    first_lasting,
    make_plan,
)
from ..store.reader import LayerInfo, Run, open_run
from .cache import CacheDamagedError, SVDCache
from .config import EngineConfig
from .decompose import Decomposition, PairValues, error_of, reason_of, storage_dtype
from .lag import Lag, LagPairs, known_times, lag_pairs
from .pairs import measure_pairs
from .pool import fill_cache
from .spectra import batch_ranks, rank_at_beta
from .stability import topk_reason

PAIRS = ("consecutive", "lag", "final", "initial")
# an empty table keeps its columns, so its CSV stays readable (e.g. a one-snapshot run)
STABILITY_COLUMNS = ["layer", "kind", "pair", "lag", "a", "b", "epoch_a", "epoch_b"]
STABILITY_COLUMNS += ["step_a", "step_b", "S", "S_err", "O_left", "O_right", "k", "reason"]
SPECTRA_COLUMNS = ["layer", "snapshot", "epoch", "step", "i", "sigma", "sigma_rel"]
RANK_COLUMNS = ["layer", "kind", "snapshot", "epoch", "step", "m", "n", "finite", "stable_rank"]
RANK_COLUMNS += ["effective_rank", "energy_rank", "cond"]
NETWORK_COLUMNS = ["snapshot", "epoch", "step", "mean_S", "weighted_S", "stable_share"]
NETWORK_COLUMNS += ["known_share", "excluded"]

log = logging.getLogger(__name__)


@dataclass
class AnalysisConfig:
    """What is measured.

    Attributes:
        lag: how far apart the "lag" pairs of the delay rule are (the paper compares epochs 5 or
            10 apart): ``5`` snapshots (reduced, with a note, when the run is shorter), or a
            time, ``"5ep"`` / ``"2.5epochs"`` or ``"200steps"`` / ``"200st"``, which pairs each
            snapshot with the one about that long before it (:mod:`.lag` has the rule). Held as
            a :class:`~.lag.Lag`.
        k: top-k of the singular-subspace overlap (capped at n and at the engine's kmax).
        eps: energy-rank tolerance: the smallest r keeping (1 - eps) of the energy.
    """

    lag: Lag | int | str = 5
    k: int = 8
    eps: float = 0.1

    def __post_init__(self) -> None:
        self.lag = Lag.parse(self.lag)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(expected("k", "a positive integer", self.k, "Use e.g. 5."))
        if not 0 < self.eps < 1:
            raise ConfigError(expected("eps", "in (0, 1)", self.eps, "Use e.g. 0.1."))


@dataclass
class Report:
    """Everything ``bstab analyze`` prints and writes. Frames are tidy, ``layer`` first."""

    run_path: Path
    stability: pd.DataFrame
    spectra: pd.DataFrame
    ranks: pd.DataFrame
    network: pd.DataFrame
    summary: pd.DataFrame
    beta_curve: pd.DataFrame
    plan: Plan | None
    n_snapshots: int
    computed: int = 0
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        from .text import report_text

        return report_text(self)


def _pairs(t_count: int, lagged: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    out = [("consecutive", b - 1, b) for b in range(1, t_count)]
    out += [("lag", a, b) for a, b in lagged]
    out += [("final", a, t_count - 1) for a in range(t_count - 1)]
    out += [("initial", 0, b) for b in range(1, t_count)]
    return out


_MISSING = "layer missing from a snapshot"


def _pair_frame(
    info: LayerInfo,
    decs: list[Decomposition | None],
    index: pd.DataFrame,
    cfg: AnalysisConfig,
    pairs: list[tuple[str, int, int]],
    values: dict[tuple[int, int], PairValues],
    s_why: list[str | None],
    engine: EngineConfig,
) -> pd.DataFrame:
    """The stability table of one layer: S and O_k of every pair, NaN with a reason where a
    basis or top-k subspace is not unique (the rules of :mod:`.stability`, which tests hold the
    engine's pair values to)."""
    if not pairs:
        return pd.DataFrame(columns=STABILITY_COLUMNS)
    kinds, a, b = (np.array(x) for x in zip(*pairs))
    k = min(cfg.k, info.shape[1], engine.kmax)
    o_why = [
        _MISSING
        if d is None
        else topk_reason(torch.from_numpy(np.asarray(d.s)), k, torch.float64, max(info.shape))
        for d in decs
    ]
    storage = storage_dtype(info)
    errors = np.array([math.nan if d is None else error_of(d, storage, engine.dtype) for d in decs])
    nan = PairValues(math.nan, np.full(k, np.nan), np.full(k, np.nan))
    got = [values.get((i, j), nan) for i, j in zip(a, b)]
    s_all = np.array([v.S for v in got], dtype=np.float64)
    s_ok = np.array([not (s_why[i] or s_why[j]) for i, j in zip(a, b)])
    o_ok = np.array([not (o_why[i] or o_why[j]) for i, j in zip(a, b)])
    s_all = np.where(s_ok, s_all, np.nan)
    left = np.where(o_ok, [v.left[k - 1] / k for v in got], np.nan)
    right = np.where(o_ok, [v.right[k - 1] / k for v in got], np.nan)
    epochs, steps = index["epoch"].to_numpy(), index["step"].to_numpy()
    s_err = np.where(np.isfinite(s_all), errors[a] + errors[b], np.nan) / math.sqrt(min(info.shape))
    frame = pd.DataFrame(
        {
            "layer": info.name,
            "kind": info.kind,
            "pair": kinds,
            "lag": b - a,
            "a": a,
            "b": b,
            "epoch_a": epochs[a],
            "epoch_b": epochs[b],
            "step_a": steps[a],
            "step_b": steps[b],
            "S": s_all,
            "S_err": s_err,
            "O_left": left,
            "O_right": right,
            "k": k,
        }
    )
    frame["reason"] = [s_why[i] or s_why[j] or o_why[i] or o_why[j] for i, j in zip(a, b)]
    return frame


def _spectra_frame(info: LayerInfo, s: np.ndarray, index: pd.DataFrame) -> pd.DataFrame:
    """One row per known singular value: ``s`` is ``(T, n)``, NaN where unknown."""
    t_idx, i_idx = np.nonzero(np.isfinite(s))
    top = s[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(top[t_idx] > 0, s[t_idx, i_idx] / top[t_idx], np.nan)
    return pd.DataFrame(
        {
            "layer": info.name,
            "snapshot": t_idx,
            "epoch": index["epoch"].to_numpy()[t_idx],
            "step": index["step"].to_numpy()[t_idx],
            "i": i_idx + 1,
            "sigma": s[t_idx, i_idx],
            "sigma_rel": rel,
        }
    )


def _rank_frame(
    info: LayerInfo, known: list, index: pd.DataFrame, cfg: AnalysisConfig
) -> pd.DataFrame:
    """One row per decomposed snapshot of one layer (ranks of all snapshots at once)."""
    t = np.array([e.t for e in known])
    s = np.stack([np.asarray(e.s, dtype=np.float64) for e in known])
    fro2 = np.array([e.fro2 for e in known])
    ranks = batch_ranks(s, cfg.eps)
    top = s[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        # only the top is known (approximate mode): the stable rank from ||W||_F instead
        from_fro = np.where(top > 0, fro2 / top**2, np.nan)
    return pd.DataFrame(
        {
            "layer": info.name,
            "kind": info.kind,
            "snapshot": t,
            "epoch": index["epoch"].to_numpy()[t],
            "step": index["step"].to_numpy()[t],
            "m": info.shape[0],
            "n": info.shape[1],
            "finite": np.isfinite(fro2),
            "stable_rank": np.where(np.isnan(ranks["stable_rank"]), from_fro, ranks["stable_rank"]),
            "effective_rank": ranks["effective_rank"],
            "energy_rank": ranks["energy_rank"],
            "cond": _condition_numbers(s),
        }
    )


def _condition_numbers(s: np.ndarray) -> np.ndarray:
    """``s_1 / s_n`` per row of ``(T, n)`` singular values: inf when singular, NaN when unknown."""
    top, low = s[:, 0], s[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(low > 0, top / low, np.inf)
    return np.where(np.isfinite(s).all(axis=1) & (top > 0), cond, np.nan)


def _network(stab: pd.DataFrame, shapes: dict[str, tuple[int, int]], tau: float) -> pd.DataFrame:
    """Per snapshot b, the lag pairs averaged over layers. A layer whose S is NaN (its basis is
    not unique, or its weights are NaN/Inf) is excluded from the means and the stable share (it
    counts neither as stable nor as unstable) and named in ``excluded`` with its reason;
    ``known_share`` is the parameter share the stable share was measured on."""
    lagged = stab[stab["pair"] == "lag"]
    if lagged.empty:
        return pd.DataFrame(columns=NETWORK_COLUMNS)
    size = lagged["layer"].map(lambda n: shapes[n][0] * shapes[n][1]).astype(float)
    known = lagged["S"].notna()
    frame = lagged.assign(
        size=size,
        wS=lagged["S"] * size,
        stable=(lagged["S"] >= tau) * size,
        known=known * size,
        why=np.where(known, "", lagged["layer"] + " (" + lagged["reason"].fillna("S is NaN") + ")"),
    )
    g = frame.groupby("b", sort=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pd.DataFrame(
            {
                "snapshot": g.size().index,
                "epoch": g["epoch_b"].first().to_numpy(),
                "step": g["step_b"].first().to_numpy(),
                "mean_S": g["S"].mean().to_numpy(),
                "weighted_S": (g["wS"].sum() / g["known"].sum()).to_numpy(),
                "stable_share": (g["stable"].sum() / g["known"].sum()).to_numpy(),
                "known_share": (g["known"].sum() / g["size"].sum()).to_numpy(),
                "excluded": g["why"].agg(lambda w: "; ".join(x for x in w if x)).to_numpy(),
            }
        )
    return out.reset_index(drop=True)


def _available(run: Run) -> tuple[dict[str, int], list[str]]:
    available, notes = {}, []
    for info in run.layers:
        # the reader refuses a layer short of the committed count (format 1.2), so this only
        # trims a live writer's half-written row
        rows = min(run.dataset(info.name).shape[0], run.n_snapshots)
        available[info.name] = rows
        if rows < run.n_snapshots:
            notes.append(
                f"layer {info.name} is missing from snapshots {rows}.."
                f"{run.n_snapshots - 1}; they are left out for it"
            )
    return available, notes


def analyze(
    path: str | Path,
    config: AnalysisConfig | None = None,
    engine: EngineConfig | None = None,
    plan: PlanConfig | None = None,
    progress: bool = False,
) -> Report | None:
    """Analyse a run (also one still being recorded): stability, overlaps, spectra, ranks, plan.

    Args:
        path: the run file.
        config: what to measure (:class:`AnalysisConfig`).
        engine: how to decompose (:class:`~basis_stability.analyze.engine.EngineConfig`): exact
            or approximate SVD, dtype, device, jobs, cache.
        plan: thresholds of the delay and beta rules
            (:class:`~basis_stability.recommend.PlanConfig`).
        progress: show a progress bar over the SVDs.

    Returns:
        A :class:`Report` with tidy DataFrames and the plan. Under torch.distributed (e.g.
        ``torchrun -m basis_stability analyze``) every rank must call this: the SVDs are shared
        out across the ranks, rank 0 gets the report and the other ranks get None.
    """
    config, engine, plan = (
        config or AnalysisConfig(),
        engine or EngineConfig(),
        plan or PlanConfig(),
    )
    world = _dist.world_size()
    lead = _dist.is_writer()
    with open_run(path) as run:
        if world > 1:  # every rank works on rank 0's view of a run that may still grow
            seen = _dist.broadcast_object(run.n_snapshots)
            if run.n_snapshots < seen:
                run.refresh()
        _check_analysable(run)
        pairing = _pair_by_lag(run, config.lag)  # a lag the run cannot take fails before any SVD
        available, notes = _available(run)
        # under torch.distributed only rank 0 keeps the cache; the others send it their SVDs
        cache = SVDCache(run, engine if lead else dataclasses.replace(engine, cache=False))
        try:
            computed = _decompose_all(run, cache, engine, available, progress)
            if not lead:
                return None
            try:
                report = _build(run, cache, available, config, plan, pairing)
            except CacheDamagedError as exc:  # only rank 0 reads entries: it recomputes alone
                cache.rebuild(f"an entry failed its checksum or could not be read ({exc.cause})")
                computed = fill_cache(run, cache, engine, available, progress)
                if cache.dropped:  # and the new file failed too: recompute what it held
                    computed += fill_cache(run, cache, engine, available, progress)
                report = _build(run, cache, available, config, plan, pairing)
        finally:
            cache.close()
    report.computed = computed
    report.notes = notes + cache.notes + report.notes
    return report


def _check_analysable(run: Run) -> None:
    if run.n_snapshots == 0:
        raise RunFileError(
            f"{run.path} has no committed snapshot yet; wait for the recorder "
            "to write one (or re-run with --follow)."
        )
    if not run.layers or not sum(info.n_params for info in run.layers):
        raise RunFileError(
            f"{run.path} records no layer weights, so there is nothing to analyse. Record a "
            "model with at least one eligible layer (bstab record --help lists the options)."
        )


def _pair_by_lag(run: Run, lag: Lag) -> LagPairs:
    """The run's lag pairs; the warning about unevenly spaced snapshots is logged here."""
    pairing = lag_pairs(lag, run.epochs, run.steps)
    if pairing.warning and _dist.is_writer():
        log.warning(pairing.warning)
    return pairing


def _decompose_all(
    run: Run, cache: SVDCache, engine: EngineConfig, available: dict[str, int], progress: bool
) -> int:
    """Decompose what the cache lacks, over the ranks under torch.distributed; a second pass if
    the cache file failed on the way (what it held went with it); a damaged one is rebuilt."""
    from . import distributed

    world = _dist.world_size()
    fill = distributed.fill_cache_sharded if world > 1 else fill_cache
    try:
        computed = fill(run, cache, engine, available, progress)
    except CacheDamagedError as exc:
        if world > 1:  # the other ranks are waiting for rank 0's task list: fail them all
            raise
        cache.rebuild(f"its commit markers could not be read ({exc.cause})")
        computed = fill(run, cache, engine, available, progress)
    if _dist.broadcast_object(cache.dropped):
        computed += fill(run, cache, engine, available, progress)
    return computed


def _build(
    run: Run,
    cache: SVDCache,
    available: dict[str, int],
    cfg: AnalysisConfig,
    plan_cfg: PlanConfig,
    pairing: LagPairs,
) -> Report:
    t_count = run.n_snapshots
    index = run.snapshots()[["snapshot", "epoch", "step"]].set_index("snapshot", drop=False)
    notes = pairing.notes + ([pairing.warning] if pairing.warning else [])
    if t_count == 1:
        notes.append("only one snapshot: spectra and ranks only; stability needs two")
    stab_frames, spec_frames, rank_frames = [], [], []
    spectra_by_t: dict[int, dict[str, np.ndarray]] = {t: {} for t in range(t_count)}
    pairs = _pairs(t_count, pairing.pairs)
    for info in run.layers:
        entries = cache.entries(info, available[info.name])
        decs = entries + [None] * (t_count - len(entries))
        storage = storage_dtype(info)
        s_why = [_MISSING if d is None else reason_of(d, info.shape, storage) for d in decs]
        values, _ = measure_pairs(
            run, info, cache, decs, [(a, b) for _, a, b in pairs], [not w for w in s_why], cache.cfg
        )
        stab_frames.append(_pair_frame(info, decs, index, cfg, pairs, values, s_why, cache.cfg))
        known = [e for e in entries if e is not None]
        if known:
            spec_frames.append(
                _spectra_frame(
                    info, np.stack([e.s for e in known]), index.iloc[[e.t for e in known]]
                )
            )
        if known:
            rank_frames.append(_rank_frame(info, known, index, cfg))
        for e in known:
            if np.isfinite(e.s).all():
                spectra_by_t[e.t][info.name] = np.asarray(e.s)
        notes += _nonfinite_notes(info, known)
    shapes = {info.name: info.shape for info in run.layers}
    stab = _concat(stab_frames, STABILITY_COLUMNS)
    ranks = _concat(rank_frames, RANK_COLUMNS)
    network = (
        _network(stab, shapes, plan_cfg.tau)
        if len(stab)
        else _network(pd.DataFrame(columns=["pair"]), shapes, plan_cfg.tau)
    )
    plan, curve = _plan(
        network, spectra_by_t, shapes, index, _interval(pairing, index), run, plan_cfg, pairing
    )
    notes += excluded_notes(network)
    if plan is not None and plan.excluded_layers:
        notes.append(excluded_layers_note(plan.excluded_layers))
    if plan is None:
        notes.append(_no_plan_note(spectra_by_t, shapes, cache.cfg.svd == "approx"))
    if plan is not None and len(ranks):
        ranks["rank_beta"] = [
            _rank_beta(spectra_by_t[t].get(n), plan.beta)
            for n, t in zip(ranks["layer"], ranks["snapshot"])
        ]
    summary = _summary(run, stab, ranks, plan_cfg.tau)
    return Report(
        run.path,
        stab,
        _concat(spec_frames, SPECTRA_COLUMNS),
        ranks,
        network,
        summary,
        curve,
        plan,
        t_count,
        notes=notes,
    )


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _rank_beta(s: np.ndarray | None, beta: float) -> int:
    """r_beta of one spectrum; -1 where the spectrum is unknown (NaN/Inf or approximate)."""
    return -1 if s is None else rank_at_beta(s, beta)


def _nonfinite_notes(info: LayerInfo, known: list) -> list[str]:
    """One note per snapshot with NaN/Inf weights, or one for a layer that has nothing else."""
    bad = [e.t for e in known if not np.isfinite(e.fro2)]
    if len(bad) > 1 and len(bad) == len(known):
        return [
            f"layer {info.name}: NaN/Inf weights in every snapshot (flagged); its stability, "
            "spectra and ranks are undefined"
        ]
    return [f"layer {info.name}, snapshot {t}: NaN/Inf weights (flagged)" for t in bad]


def _no_plan_note(spectra_by_t: dict, shapes: dict, approx: bool) -> str:
    """Why no snapshot has the full spectrum of every layer, naming the real cause."""
    head = "no plan: it needs a snapshot whose full spectra are known for every layer"
    if approx:
        return f"{head} (the approximate SVD mode computes only the top singular values)"
    never = [name for name in shapes if not any(name in d for d in spectra_by_t.values())]
    if never:
        return f"{head}, but layer(s) {', '.join(never)} have NaN/Inf weights in every snapshot"
    return f"{head}, but every snapshot has NaN/Inf weights (or lacks a layer) somewhere"


def _interval(pairing: LagPairs, index: pd.DataFrame) -> int | Interval:
    """The plan's interval: a lag in snapshots as before; for a lag in time, the median over its
    pairs of the snapshots, epochs and steps apart (where the run records them)."""
    if pairing.snapshots is not None:
        return pairing.snapshots
    if not pairing.pairs:  # a one-snapshot run
        return Interval(pairing.lag.given, 1, None, None)
    a, b = (np.array(x) for x in zip(*pairing.pairs))
    medians = []
    for column in ("epoch", "step"):
        times = index[column].to_numpy(dtype=np.float64)
        ok = known_times(times[a]) & known_times(times[b])
        span = float(np.median(times[b][ok] - times[a][ok])) if ok.any() else math.nan
        medians.append(span if span > 0 else None)
    epochs, steps = medians
    snapshots = max(1, int(round(float(np.median(b - a)))))
    return Interval(pairing.lag.given, snapshots, epochs, None if steps is None else round(steps))


def _plan(network, spectra_by_t, shapes, index, lag, run, cfg, pairing=None):
    """The plan, with beta and the expected share over the layers OIALR would factorise (from
    the recorded kinds and tall shapes, auto mode's eligibility), or None without full spectra."""
    complete = [t for t, d in spectra_by_t.items() if len(d) == len(shapes)]
    if not complete or not sum(m * n for m, n in shapes.values()):
        return None, pd.DataFrame(columns=["beta", "trainable_share", "min_energy", "mean_energy"])
    usable = network[network["snapshot"].isin(complete)]
    by_t = {t: spectra_by_t[t] for t in complete}
    kinds = {info.name: info.kind for info in run.layers}
    return make_plan(
        usable,
        by_t,
        shapes,
        index,
        lag,
        run.model_class,
        cfg,
        kinds=kinds,
        uneven_spacing=pairing.warning if pairing is not None else None,
    )


def _summary(run: Run, stab: pd.DataFrame, ranks: pd.DataFrame, tau: float) -> pd.DataFrame:
    rows = []
    lagged = stab[stab["pair"] == "lag"] if len(stab) else stab
    for info in run.layers:
        mine = lagged[lagged["layer"] == info.name] if len(lagged) else lagged
        last = ranks[ranks["layer"] == info.name].tail(1)
        row = {
            "layer": info.name,
            "kind": info.kind,
            "m": info.shape[0],
            "n": info.shape[1],
            "params": info.n_params,
            "final_S": math.nan,
            "final_O_left": math.nan,
            "final_O_right": math.nan,
            "k": math.nan,
            "stable_from_epoch": math.nan,
        }
        if len(mine):
            last_pair = mine.iloc[-1]
            row["final_S"] = float(last_pair["S"])
            row["final_O_left"] = float(last_pair["O_left"])
            row["final_O_right"] = float(last_pair["O_right"])
            row["k"] = int(last_pair["k"])
            first = first_lasting((mine["S"] >= tau).to_numpy())
            if first is not None:
                row["stable_from_epoch"] = float(mine["epoch_b"].to_numpy()[first])
        for col in ("stable_rank", "effective_rank", "energy_rank", "rank_beta"):
            row[col] = last[col].iloc[0] if len(last) and col in last else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
