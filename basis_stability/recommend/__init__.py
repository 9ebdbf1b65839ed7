"""Recommend: the pure rules of OIALR (:mod:`.rules`) and the plan made from an analysis'
tables (:mod:`.plan`). Plain data in, plain data out."""

from .plan import (
    NETWORK_COLUMNS,
    Interval,
    Plan,
    PlanConfig,
    assess,
    beta_curve,
    check_plan_matches,
    choose_beta,
    choose_delay,
    excluded_layers_note,
    excluded_notes,
    expected_share,
    kept_energy,
    make_plan,
    network_table,
)
from .rules import delay_start, first_lasting, rank_at_beta, stable_share

__all__ = [
    "NETWORK_COLUMNS",
    "Interval",
    "Plan",
    "PlanConfig",
    "assess",
    "beta_curve",
    "check_plan_matches",
    "choose_beta",
    "choose_delay",
    "delay_start",
    "excluded_layers_note",
    "excluded_notes",
    "expected_share",
    "first_lasting",
    "kept_energy",
    "make_plan",
    "network_table",
    "rank_at_beta",
    "stable_share",
]
