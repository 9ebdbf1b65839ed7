"""Analyze: basis stability, top-k overlap, spectra and ranks of a recorded run (SPEC §2-§4)."""

from .engine import EngineConfig
from .report import AnalysisConfig, Report, analyze

__all__ = ["AnalysisConfig", "EngineConfig", "Report", "analyze"]
