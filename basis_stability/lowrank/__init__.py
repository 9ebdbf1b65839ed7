"""Low-rank layers (U S Vh with frozen bases) and the model surgery that installs them."""

from .layers import LowRankConv, LowRankFactor, LowRankLinear, LowRankMultiheadAttention
from .surgery import (
    FactorizeConfig,
    SurgeryReport,
    densify_,
    eligible_layers,
    factor_of,
    factorize_,
    low_rank_layers,
)

__all__ = [
    "FactorizeConfig",
    "LowRankConv",
    "LowRankFactor",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "SurgeryReport",
    "densify_",
    "eligible_layers",
    "factor_of",
    "factorize_",
    "low_rank_layers",
]
