"""Analysis: basis stability, top-k overlap, spectra and ranks of a recorded run (SPEC §2-§4).

:func:`measure` makes the tables; the plan is the next stage's (:mod:`basis_stability.recommend`);
``basis_stability.analyze(path)`` runs both.
"""

from .config import EngineConfig
from .report import AnalysisConfig, PlanInputs, Report, measure

__all__ = ["AnalysisConfig", "EngineConfig", "PlanInputs", "Report", "measure"]
