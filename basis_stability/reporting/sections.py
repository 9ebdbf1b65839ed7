"""The sections of the HTML report, each from a report's frames and plan: escaped HTML strings.

Nothing here reads a file or draws a figure (:mod:`.page` does both); every value a run or a
layer name brings is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import significant

if TYPE_CHECKING:
    from ..analysis.report import Report
    from .runinfo import RunInfo

DASH = "–"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted, or a dash when it is missing (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return DASH
    return format(value, spec)


def epochs(value: Any) -> str:
    """An epoch (often a fraction of step-based snapshots) to 3 significant digits, or a dash."""
    text = num(value, "g")
    return text if text == DASH else significant(float(value))


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    row_classes: Sequence[str] | None = None,
    css: str = "data",
) -> str:
    """An HTML table; cells are escaped. ``row_classes`` marks rows (e.g. ``nan``)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        attr = f' class="{esc(cls)}"' if cls else ""
        cells = [_breakable(esc(row[0]))] + [esc(c) for c in row[1:]] if len(row) else []
        body.append(f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _breakable(name: str) -> str:
    """A (layer) name that may wrap after each '.' or '/' where the table needs the room, and
    nowhere else: ``bert.encoder.layer.0.attention.self.query`` never loses characters."""
    return name.replace(".", ".<wbr>").replace("/", "/<wbr>")


def key_values(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def bullets(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>" if items else ""


# ---------------------------------------------------------------------- what is undefined
def nan_layers(report: Report) -> dict[str, str]:
    """Each layer whose lag S is NaN at some snapshot: how often, and why (the first reason)."""
    stab = report.stability
    if not len(stab):
        return {}
    lagged = stab[stab["pair"] == "lag"]
    out = {}
    for name, rows in lagged.groupby("layer", sort=False):
        bad = rows[rows["S"].isna()]
        if len(bad):
            why = bad["reason"].dropna()
            reason = str(why.iloc[0]) if len(why) else "S is NaN"
            out[str(name)] = f"S undefined at {len(bad)} of {len(rows)} lag pairs: {reason}"
    return out


def banners(report: Report, info: RunInfo | None) -> list[tuple[str, str]]:
    """``(level, text)`` of what a reader must know before the numbers: a live or incomplete
    run, a run without pairs, layers whose S is undefined, no plan."""
    out = []
    if info is not None and info.live:
        out.append(
            (
                "warn",
                f"This run is live or incomplete ({info.live}). The report covers the "
                f"{report.n_snapshots} snapshots committed when it was read; write the report "
                "again once the run is complete for the rest.",
            )
        )
    if report.n_snapshots < 2:
        out.append(
            (
                "warn",
                f"Only {report.n_snapshots} snapshot: there are no snapshot pairs, so no "
                "stability S, no overlap O_k and no delay. Spectra and ranks only.",
            )
        )
    bad = nan_layers(report)
    if bad:
        out.append(
            (
                "warn",
                f"{len(bad)} layer(s) have an undefined S (NaN) somewhere: "
                f"{', '.join(bad)}. They are excluded from the stable share, not counted as "
                "unstable; see Notes.",
            )
        )
    if report.plan is None:
        out.append(("error", "No plan could be made; see Notes for why."))
    return out


# ---------------------------------------------------------------------- the sections
def plan_section(report: Report) -> str:
    """The plan's numbers (delay, interval, beta, expected share) with why, and its ranks."""
    plan = report.plan
    if plan is None:
        return "<p>No plan.</p>" + bullets([n for n in report.notes if n.startswith("no plan")])
    rules = plan.rules
    energy = plan.evidence.get("kept_energy") or {}
    at = plan.evidence.get("spectra_snapshot")
    if plan.delay_snapshot is None:
        delay = f"none — {rules['delay']['why']}"
    else:
        step = f", step {plan.delay_step}" if plan.delay_step is not None else ""
        delay = f"epoch {epochs(plan.delay_epoch)}{step} (snapshot {plan.delay_snapshot})"
    interval = f"{plan.interval_snapshots} snapshot(s)"
    if plan.interval_epochs is not None:
        interval += f", {epochs(plan.interval_epochs)} epoch(s)"
    share_at = plan.evidence.get("stable_share_at_delay")
    rows = [
        ("delay", delay),
        (
            "delay rule",
            f"from the delay on, ≥ {rules['delay']['share']:.0%} of the parameters sit in "
            f"layers with lag-{rules['delay'].get('lag', '?')} S ≥ {rules['delay']['tau']:g}"
            + (f" (stable share there {share_at:.1%})" if share_at is not None else ""),
        ),
        ("update interval", interval),
        ("beta", f"{plan.beta:g}"),
        ("beta rule", f"{rules['beta']['rule']}: {rules['beta']['why']}"),
        ("lowest kept energy", f"{min(energy.values()):.1%}" if energy else DASH),
        ("expected trainable share", f"{plan.expected_trainable_share:.1%} of the recorded layers"),
        ("spectra from", f"snapshot {at}" if at is not None else DASH),
    ]
    out = f'<div class="cards">{_cards(plan)}</div>' + key_values(rows)
    out += "<h3>Ranks at beta</h3>" + _rank_table(plan, energy)
    if plan.excluded_layers:
        out += "<h3>Kept dense</h3>" + bullets(
            [f"{n}: {why}" for n, why in plan.excluded_layers.items()]
        )
    if plan.notes:
        out += "<h3>Why, in the plan's words</h3>" + bullets(plan.notes)
    return out


def _cards(plan: Any) -> str:
    delay = DASH if plan.delay_epoch is None else f"epoch {epochs(plan.delay_epoch)}"
    cards = [
        ("delay", delay),
        ("beta", f"{plan.beta:g}"),
        ("trainable share", f"{plan.expected_trainable_share:.1%}"),
    ]
    return "".join(
        f'<div class="card"><div class="label">{esc(k)}</div><div class="value">{esc(v)}</div>'
        "</div>"
        for k, v in cards
    )


def _rank_table(plan: Any, energy: dict[str, float]) -> str:
    rows = []
    for name, rank in plan.ranks.items():
        m, n = plan.layers.get(name, (0, 0))
        pays = rank * (m + n) < m * n
        rows.append(
            (
                name,
                f"{m}×{n}",
                f"{rank}/{n}",
                num(energy.get(name), ".1%"),
                "factorised" if pays else "dense (factors would not pay)",
            )
        )
    return table(["layer", "shape", "rank", "kept energy", "OIALR"], rows)


SUMMARY_HEADER = ["layer", "kind", "shape", "params", "final S", "final O_k U/V", "stable from"]
SUMMARY_HEADER += ["stable rank", "eff. rank", "energy rank", "r@β", "S undefined"]


def summary_section(report: Report) -> str:
    """One row per analysed layer (the summary frame); rows with an undefined S are marked."""
    bad = nan_layers(report)
    rows, classes = [], []
    for r in report.summary.itertuples():
        overlap = DASH
        if not (isinstance(r.k, float) and math.isnan(r.k)):
            overlap = f"{num(r.final_O_left)}/{num(r.final_O_right)} (k={int(r.k)})"
        rank_beta = DASH if pd.isna(r.rank_beta) or r.rank_beta < 0 else f"{int(r.rank_beta)}/{r.n}"
        rows.append(
            (
                r.layer,
                r.kind,
                f"{r.m}×{r.n}",
                f"{int(r.params):,}",
                num(r.final_S),
                overlap,
                DASH if pd.isna(r.stable_from_epoch) else f"epoch {epochs(r.stable_from_epoch)}",
                num(r.stable_rank, ".1f"),
                num(r.effective_rank, ".1f"),
                num(r.energy_rank, ".0f"),
                rank_beta,
                bad.get(r.layer, ""),
            )
        )
        classes.append("nan" if r.layer in bad else "")
    header = SUMMARY_HEADER if bad else SUMMARY_HEADER[:-1]  # the reasons only where any
    rows = [row if bad else row[:-1] for row in rows]
    beta = f" (r@β at β = {report.plan.beta:g})" if report.plan is not None else ""
    return (
        f"<p>The last lag pair and the last ranks of each of the {len(rows)} analysed layers"
        f"{esc(beta)}; S = 1 is a basis that no longer moves.</p>" + table(header, rows, classes)
    )


def network_section(report: Report) -> str:
    """The network table: per snapshot, mean and weighted S and the stable share."""
    net = report.network
    if not len(net):
        return "<p>No stability pairs: the network table needs two snapshots.</p>"
    rows = [
        (
            int(r.snapshot),
            epochs(r.epoch),
            DASH if pd.isna(r.step) or r.step < 0 else int(r.step),
            num(r.mean_S),
            num(r.weighted_S),
            num(r.stable_share, ".1%"),
            num(r.known_share, ".1%"),
            r.excluded if isinstance(r.excluded, str) else "",
        )
        for r in net.itertuples()
    ]
    delay = report.plan.delay_snapshot if report.plan is not None else None
    classes = ["delay" if int(r[0]) == delay else "" for r in rows]
    header = ["snapshot", "epoch", "step", "mean S", "weighted S", "stable share"]
    header += ["S defined for", "excluded"]
    return (
        "<p>Lag pairs over the layers OIALR would factorise; the delay's row is marked.</p>"
        + table(header, rows, classes)
    )


def notes_section(report: Report, info: RunInfo | None) -> str:
    """The analysis' notes, the layers whose S is undefined, and the layers never recorded."""
    out = ""
    bad = nan_layers(report)
    if bad:
        out += "<h3>Layers with an undefined S</h3>" + bullets(
            [f"{n}: {w}" for n, w in bad.items()]
        )
    if info is not None and info.skipped:
        out += "<h3>Skipped at recording</h3>" + bullets([f"{n}: {w}" for n, w in info.skipped])
    notes = list(dict.fromkeys(report.notes))
    out += "<h3>Analysis notes</h3>" + (bullets(notes) or "<p>None.</p>")
    return out
