"""Built-in models and offline datasets for the default jobs (no downloads, ever)."""

from .datasets import DATASETS, Dataset, load_dataset
from .models import MODELS, build_model, check_pair

__all__ = ["DATASETS", "MODELS", "Dataset", "build_model", "check_pair", "load_dataset"]
