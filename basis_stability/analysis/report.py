"""Measure a run: tidy tables of stability, overlap, spectra and ranks (SPEC §2-§4).

:func:`measure` is the analysis stage. It knows no threshold: the plan, the stable share and
"stable from" are the recommend stage's (:func:`basis_stability.recommend.assess`), and
:func:`basis_stability.analyze` wires the two.

Example:
    >>> report = measure("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
    >>> report.stability.query("pair == 'lag'")[["layer", "b", "S"]]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import _dist
from ..errors import ConfigError, RunFileError, check_config, expected, positive_int
from ..store.lock import live_status
from ..store.reader import LayerInfo, Run, open_run
from .cache import CacheDamagedError, SVDCache
from .config import EngineConfig
from .decompose import Decomposition, PairValues, error_of, reason_of, storage_dtype
from .lag import Interval, Lag, LagPairs, interval_of, lag_pairs
from .pairs import measure_pairs
from .pool import fill_cache
from .spectra import batch_ranks
from .stability import topk_reason

PAIRS = ("consecutive", "lag", "final", "initial")
# an empty table keeps its columns, so its CSV stays readable (e.g. a one-snapshot run)
STABILITY_COLUMNS = ["layer", "kind", "pair", "lag", "a", "b", "epoch_a", "epoch_b"]
STABILITY_COLUMNS += ["step_a", "step_b", "S", "S_err", "O_left", "O_right", "k", "reason"]
SPECTRA_COLUMNS = ["layer", "snapshot", "epoch", "step", "i", "sigma", "sigma_rel"]
RANK_COLUMNS = ["layer", "kind", "snapshot", "epoch", "step", "m", "n", "finite", "stable_rank"]
RANK_COLUMNS += ["effective_rank", "energy_rank", "cond"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
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
        object.__setattr__(self, "lag", Lag.parse(self.lag))
        object.__setattr__(self, "k", positive_int("k", self.k, "Use e.g. 5."))
        if not 0 < self.eps < 1:
            raise ConfigError(expected("eps", "in (0, 1)", self.eps, "Use e.g. 0.1."))


@dataclass(frozen=True)
class PlanInputs:
    """What the plan needs from a measured run besides its tables.

    Attributes:
        shapes: tall shape (m, n) per layer.
        kinds: registry kind per layer, as recorded.
        index: ``snapshot``, ``epoch``, ``step`` per snapshot, indexed by snapshot.
        interval: how far apart the lag pairs are (:class:`~.lag.Interval`).
        spacing_warning: the warning about unevenly spaced snapshots paired by a lag in
            snapshots; None otherwise.
        spectra: ``spectra[t][layer]``: the full, finite singular values known at snapshot t.
        approx: the engine computed only the top singular values.
        model_class: the recorded model's class name.
    """

    shapes: dict[str, tuple[int, int]]
    kinds: dict[str, str]
    index: pd.DataFrame
    interval: Interval
    spacing_warning: str | None
    spectra: dict[int, dict[str, np.ndarray]]
    approx: bool
    model_class: str


@dataclass
class Report:
    """Everything ``bstab analyze`` prints and writes. Frames are tidy, ``layer`` first.

    :func:`measure` fills the measured tables; :func:`basis_stability.recommend.assess` adds
    ``network``, ``beta_curve``, ``plan`` and the threshold columns (``stable_from_epoch``,
    ``rank_beta``); until then they are empty (``plan`` None, the columns NaN).
    """

    run_path: Path
    stability: pd.DataFrame
    spectra: pd.DataFrame
    ranks: pd.DataFrame
    network: pd.DataFrame
    summary: pd.DataFrame
    beta_curve: pd.DataFrame
    plan: Any | None  # a basis_stability.recommend.Plan
    n_snapshots: int
    computed: int = 0
    notes: list[str] = field(default_factory=list)
    live: str | None = None  # why the run may still change (store.lock.live_status), or None
    inputs: PlanInputs | None = field(default=None, repr=False, compare=False)

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


def available_rows(run: Run) -> tuple[dict[str, int], list[str]]:
    """Per layer, the snapshots it has (a live writer may be mid-row), and a note for each
    layer missing from the last ones."""
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


def measure(
    path: str | Path,
    config: AnalysisConfig | None = None,
    engine: EngineConfig | None = None,
    progress: bool = False,
) -> Report | None:
    """Measure a run (also one still being recorded): stability, overlaps, spectra, ranks.

    Args:
        path: the run file.
        config: what to measure (:class:`AnalysisConfig`).
        engine: how to decompose (:class:`~basis_stability.analysis.config.EngineConfig`):
            exact or approximate SVD, dtype, device, jobs, cache.
        progress: show a progress bar over the decompositions.

    Returns:
        A :class:`Report` of the measured tables (no plan: see
        :func:`basis_stability.recommend.assess`). Under torch.distributed every rank must
        call this: the decompositions are shared out across the ranks, rank 0 gets the report
        and the other ranks get None.
    """
    check_config("config", config, AnalysisConfig)
    check_config("engine", engine, EngineConfig)
    config, engine = config or AnalysisConfig(), engine or EngineConfig()
    live = live_status(path)  # before the open, which may wait for a live writer's flush
    with open_run(path) as run:
        if _dist.world_size() > 1:  # every rank works on rank 0's view of a run that may grow
            seen = _dist.broadcast_object(run.n_snapshots)
            if run.n_snapshots < seen:
                run.refresh()
        check_analysable(run)
        pairing = _pair_by_lag(run, config.lag)  # a lag the run cannot take fails before any SVD
        available, notes = available_rows(run)
        # under torch.distributed only rank 0 keeps the cache; the others send it their SVDs
        lead = _dist.is_writer()
        cache = SVDCache(run, engine if lead else dataclasses.replace(engine, cache=False))
        try:
            computed = _decompose_all(run, cache, engine, available, progress)
            if not lead:
                return None
            report, recomputed = _tables(run, cache, engine, available, config, pairing, progress)
        finally:
            cache.close()
    report.computed = computed if recomputed is None else recomputed
    report.live = live
    if live is not None:
        notes.insert(
            0,
            f"the run is {live}: this covers only what it had committed when it was read; "
            "analyse it again once it is complete",
        )
    report.notes = notes + cache.notes + report.notes
    return report


def _tables(
    run: Run,
    cache: SVDCache,
    engine: EngineConfig,
    available: dict[str, int],
    config: AnalysisConfig,
    pairing: LagPairs,
    progress: bool,
) -> tuple[Report, int | None]:
    """The tables from the cache, and None; or, when a cache entry fails its checksum, the
    tables built again after recomputing the cache (only rank 0 reads entries, so it
    recomputes alone), and the count recomputed."""
    try:
        return _build(run, cache, available, config, pairing), None
    except CacheDamagedError as exc:
        cache.rebuild(f"an entry failed its checksum or could not be read ({exc.cause})")
        computed = fill_cache(run, cache, engine, available, progress)
        if cache.dropped:  # and the new file failed too: recompute what it held
            computed += fill_cache(run, cache, engine, available, progress)
        return _build(run, cache, available, config, pairing), computed


def check_analysable(run: Run) -> None:
    """Refuse a run with no committed snapshot, or with no layer weights, naming the fix."""
    if run.n_snapshots == 0:
        raise RunFileError(
            f"{run.path} has no committed snapshot yet; wait for the recorder "
            "to write one (or follow it: `follow=True`).",
            argument="follow",
        )
    if not run.layers or not sum(info.n_params for info in run.layers):
        raise RunFileError(
            f"{run.path} records no layer weights, so there is nothing to analyse. Record a "
            "model with at least one eligible layer (`include`, `types`)."
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
    pairing: LagPairs,
) -> Report:
    t_count = run.n_snapshots
    index = run.snapshots()[["snapshot", "epoch", "step"]].set_index("snapshot", drop=False)
    notes = pairing.notes + ([pairing.warning] if pairing.warning else [])
    if t_count == 1:
        notes.append("only one snapshot: spectra and ranks only; stability needs two")
    pairs = _pairs(t_count, pairing.pairs)
    stab, spec, rank = [], [], []
    spectra_by_t: dict[int, dict[str, np.ndarray]] = {t: {} for t in range(t_count)}
    for info in run.layers:
        known, tables = _layer_tables(run, cache, info, available[info.name], cfg, pairs, index)
        for frames, frame in zip((stab, spec, rank), tables):
            if frame is not None:
                frames.append(frame)
        for e in known:
            if np.isfinite(e.s).all():
                spectra_by_t[e.t][info.name] = np.asarray(e.s)
        notes += _nonfinite_notes(info, known)
    stab, ranks = _concat(stab, STABILITY_COLUMNS), _concat(rank, RANK_COLUMNS)
    inputs = PlanInputs(
        shapes={info.name: info.shape for info in run.layers},
        kinds={info.name: info.kind for info in run.layers},
        index=index,
        interval=interval_of(pairing, index),
        spacing_warning=pairing.warning,
        spectra=spectra_by_t,
        approx=cache.cfg.svd == "approx",
        model_class=run.model_class,
    )
    empty = pd.DataFrame()
    return Report(
        run.path,
        stab,
        _concat(spec, SPECTRA_COLUMNS),
        ranks,
        network=empty,
        summary=_summary(run, stab, ranks),
        beta_curve=empty,
        plan=None,
        n_snapshots=t_count,
        notes=notes,
        inputs=inputs,
    )


def _layer_tables(
    run: Run,
    cache: SVDCache,
    info: LayerInfo,
    rows: int,
    cfg: AnalysisConfig,
    pairs: list[tuple[str, int, int]],
    index: pd.DataFrame,
) -> tuple[list[Decomposition], tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]]:
    """One layer's decompositions and its stability, spectra and rank frames (None: none)."""
    entries = cache.entries(info, rows)
    decs = entries + [None] * (run.n_snapshots - len(entries))
    storage = storage_dtype(info)
    s_why = [_MISSING if d is None else reason_of(d, info.shape, storage) for d in decs]
    wanted = [(a, b) for _, a, b in pairs]
    values, _ = measure_pairs(run, info, cache, decs, wanted, [not w for w in s_why], cache.cfg)
    stab = _pair_frame(info, decs, index, cfg, pairs, values, s_why, cache.cfg)
    known = [e for e in entries if e is not None]
    if not known:
        return known, (stab, None, None)
    s = np.stack([e.s for e in known])
    spec = _spectra_frame(info, s, index.iloc[[e.t for e in known]])
    return known, (stab, spec, _rank_frame(info, known, index, cfg))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _nonfinite_notes(info: LayerInfo, known: list) -> list[str]:
    """One note per snapshot with NaN/Inf weights, or one for a layer that has nothing else."""
    bad = [e.t for e in known if not np.isfinite(e.fro2)]
    if len(bad) > 1 and len(bad) == len(known):
        return [
            f"layer {info.name}: NaN/Inf weights in every snapshot (flagged); its stability, "
            "spectra and ranks are undefined"
        ]
    return [f"layer {info.name}, snapshot {t}: NaN/Inf weights (flagged)" for t in bad]


def _summary(run: Run, stab: pd.DataFrame, ranks: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: its shape, its last lag pair and its last ranks. The threshold
    columns (``stable_from_epoch``, ``rank_beta``) are NaN until the plan stage fills them."""
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
        for col in ("stable_rank", "effective_rank", "energy_rank"):
            row[col] = last[col].iloc[0] if len(last) else math.nan
        row["rank_beta"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)
