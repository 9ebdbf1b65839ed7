"""The concise text ``bstab analyze`` prints: a per-layer table and the network summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import significant

if TYPE_CHECKING:
    from .report import Report


def _num(value: float, fmt: str) -> str:
    """``value`` in format ``fmt``, or '-' when missing; fmt 'epoch' rounds to 3 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return significant(value) if fmt == "epoch" else format(value, fmt)


def _overlap(r) -> str:
    if math.isnan(r.k):
        return "-"
    return f"{_num(r.final_O_left, '.3f')}/{_num(r.final_O_right, '.3f')} (k={int(r.k)})"


def layer_table(report: Report) -> list[str]:
    s = report.summary
    beta = report.plan.beta if report.plan else None
    head = (
        "layer",
        "shape",
        "final S",
        "final O_k U/V",
        "stable from",
        "stable rank",
        "eff. rank",
        f"r@β={beta:g}" if beta else "r@β",
    )
    rows = [head]
    for r in s.itertuples():
        rows.append(
            (
                r.layer,
                f"{r.m}x{r.n}",
                _num(r.final_S, ".3f"),
                _overlap(r),
                _num(r.stable_from_epoch, "epoch"),
                _num(r.stable_rank, ".1f"),
                _num(r.effective_rank, ".1f"),
                "-"
                if r.rank_beta is None
                or r.rank_beta < 0
                or (isinstance(r.rank_beta, float) and math.isnan(r.rank_beta))
                else f"{int(r.rank_beta)}/{r.n}",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return [
        "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]


def network_lines(report: Report) -> list[str]:
    net, plan = report.network, report.plan
    lines = [
        f"{report.n_snapshots} snapshots, {len(report.summary)} layers, {report.computed} new SVDs"
    ]
    if len(net) and net["weighted_S"].notna().any():
        lag = plan.rules["delay"].get("lag", plan.interval_snapshots) if plan else "?"
        low = net["weighted_S"].idxmin()
        first, lowest = significant(net["epoch"].iloc[0]), significant(net["epoch"][low])
        lines.append(
            f"mean stability (lag {lag}, parameter-weighted): first {net['weighted_S'].iloc[0]:.3f}"
            f" at epoch {first}, lowest {net['weighted_S'][low]:.3f} at epoch "
            f"{lowest}, last {net['weighted_S'].iloc[-1]:.3f}"
        )
    if plan is None:
        return lines
    rules = plan.rules
    if plan.delay_snapshot is not None:
        step = f", step {plan.delay_step}" if plan.delay_step is not None else ""
        epoch = _num(plan.delay_epoch, "epoch")
        lines.append(
            f"delay: epoch {epoch}{step} (snapshot {plan.delay_snapshot}): "
            f"from there >= {rules['delay']['share']:.0%} of parameters sit in layers with "
            f"S >= {rules['delay']['tau']}"
            + (" (of those whose S is defined; see the notes)" if _any_excluded(net) else "")
        )
    else:
        lines.append(f"delay: none — {rules['delay']['why']}")
    energy = min(plan.evidence["kept_energy"].values())
    lines.append(
        f"beta: {plan.beta:g} ({rules['beta']['why']}; lowest kept energy "
        f"{energy:.1%}); expected trainable share {plan.expected_trainable_share:.1%} "
        "of the recorded layers"
    )
    return lines


def _any_excluded(net) -> bool:
    return "excluded" in net and bool((net["excluded"].fillna("") != "").any())


def report_text(report: Report) -> str:
    lines = [str(report.run_path), *layer_table(report), "", *network_lines(report)]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
