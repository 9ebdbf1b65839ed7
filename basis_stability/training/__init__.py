"""Training: the plain full-rank loop used by ``bstab record`` (OIALR builds on it)."""

from .loop import TrainConfig, evaluate, fit, make_optimizer

__all__ = ["TrainConfig", "evaluate", "fit", "make_optimizer"]
