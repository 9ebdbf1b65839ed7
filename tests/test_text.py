"""The text ``bstab analyze`` prints (analysis/text.py): every number it shows is the report's,
formatted as documented, and missing values are a dash, never ``nan``."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

import basis_stability as bs
from basis_stability.analysis import AnalysisConfig, EngineConfig
from basis_stability.analysis.text import layer_table, network_lines, report_text

HEADER = ["layer", "shape", "final S", "final O_k U/V", "stable from", "stable rank", "eff. rank"]


@pytest.fixture(scope="module")
def report(tiny_run_file):
    # no cache: nothing is written beside the shared run
    return bs.analyze(tiny_run_file, AnalysisConfig(lag=2), engine=EngineConfig(cache=False))


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _want_row(r) -> list[str]:
    """A summary row as the table should show it, formatted here from the frame."""

    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    overlap = f"{r.final_O_left:.3f}/{r.final_O_right:.3f} (k={int(r.k)})"
    rank = "-" if math.isnan(r.rank_beta) or r.rank_beta < 0 else f"{int(r.rank_beta)}/{r.n}"
    return [
        r.layer,
        f"{r.m}x{r.n}",
        num(r.final_S, ".3f"),
        overlap,
        num(r.stable_from_epoch, "g"),
        num(r.stable_rank, ".1f"),
        num(r.effective_rank, ".1f"),
        rank,
    ]


# ---------------------------------------------------------------------- the layer table
def test_the_table_has_one_row_per_layer_with_the_summarys_numbers(report):
    lines = layer_table(report)
    assert _cells(lines[0]) == [*HEADER, f"r@β={report.plan.beta:g}"]
    assert len(lines) == 1 + len(report.summary) == 3
    for line, row in zip(lines[1:], report.summary.itertuples()):
        assert _cells(line) == _want_row(row)
    assert len({len(line) for line in lines}) == 1  # columns padded to one width
    assert lines[1].startswith("fc ") and lines[2].startswith("head ")  # names left-aligned


def test_missing_values_are_dashes(report):
    summary = report.summary.copy()
    summary.loc[1, ["final_S", "stable_rank", "effective_rank"]] = np.nan
    summary.loc[1, "rank_beta"] = -1  # no rank at beta
    summary.loc[0, "stable_from_epoch"] = 3.0
    summary.loc[0, ["k", "final_O_left"]] = np.nan
    lines = layer_table(dataclasses.replace(report, summary=summary, plan=None))
    assert _cells(lines[0])[-1] == "r@β"  # no plan, no beta
    fc, head = _cells(lines[1]), _cells(lines[2])
    assert fc[3] == "-" and fc[4] == "3"
    assert head[2] == head[5] == head[6] == head[7] == "-"
    assert "nan" not in "\n".join(lines).lower()


# ---------------------------------------------------------------------- the network lines
def test_network_lines_name_the_counts_and_the_weighted_stability(report):
    lines = network_lines(report)
    n, layers = report.n_snapshots, len(report.summary)
    assert lines[0] == f"{n} snapshots, {layers} layers, {report.computed} new SVDs"
    assert (n, layers, report.computed) == (4, 2, 8)  # 4 snapshots x 2 layers, no cache
    net = report.network
    low = net["weighted_S"].idxmin()
    lag = report.plan.rules["delay"]["lag"]
    assert lines[1] == (
        f"mean stability (lag {lag}, parameter-weighted): first {net['weighted_S'].iloc[0]:.3f}"
        f" at epoch {net['epoch'].iloc[0]:g}, lowest {net['weighted_S'][low]:.3f} at epoch "
        f"{net['epoch'][low]:g}, last {net['weighted_S'].iloc[-1]:.3f}"
    )


def test_without_a_delay_the_text_gives_the_reason_and_the_beta_line_its_numbers(report):
    plan = report.plan
    assert plan.delay_snapshot is None  # random snapshots never settle
    lines = network_lines(report)
    assert lines[2] == f"delay: none — {plan.rules['delay']['why']}"
    energy = min(plan.evidence["kept_energy"].values())
    beta = lines[3]
    assert beta.startswith(f"beta: {plan.beta:g} ({plan.rules['beta']['why']}; ")
    assert f"lowest kept energy {energy:.1%}" in beta
    assert f"expected trainable share {plan.expected_trainable_share:.1%}" in beta


def test_a_delay_is_shown_with_its_epoch_step_snapshot_and_thresholds(report):
    plan = dataclasses.replace(report.plan, delay_snapshot=3, delay_epoch=3.0, delay_step=30)
    line = network_lines(dataclasses.replace(report, plan=plan))[2]
    rules = plan.rules["delay"]
    assert line == (
        f"delay: epoch 3, step 30 (snapshot 3): from there >= {rules['share']:.0%} of "
        f"parameters sit in layers with S >= {rules['tau']}"
    )
    no_step = dataclasses.replace(plan, delay_step=None)
    assert (
        "delay: epoch 3 (snapshot 3)" in network_lines(dataclasses.replace(report, plan=no_step))[2]
    )


def test_without_a_plan_there_are_no_delay_and_beta_lines(report):
    lines = network_lines(dataclasses.replace(report, plan=None))
    assert len(lines) == 2 and "lag ?" in lines[1]
    assert not any(line.startswith(("delay", "beta")) for line in lines)


# ---------------------------------------------------------------------- the whole text
def test_report_text_is_path_table_blank_network_and_notes(report):
    noted = dataclasses.replace(report, notes=["first thing", "second thing"])
    lines = report_text(noted).split("\n")
    table, network = layer_table(noted), network_lines(noted)
    assert lines[0] == str(report.run_path)
    assert lines[1 : 1 + len(table)] == table
    assert lines[1 + len(table)] == ""
    assert lines[2 + len(table) : 2 + len(table) + len(network)] == network
    assert lines[-2:] == ["note: first thing", "note: second thing"]
    assert report.text() == report_text(report)
