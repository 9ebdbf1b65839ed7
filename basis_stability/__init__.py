"""basis_stability: record how a network's weight bases settle during training, analyse it, and
exploit it to train low-rank (OIALR).

The public API is imported lazily so that ``import basis_stability`` stays light (no h5py,
matplotlib or click until used)::

    from basis_stability import Recorder, open_run, every
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "Recorder": "record",
    "RecordConfig": "record",
    "every": "record",
    "every_epoch": "record",
    "at": "record",
    "logspaced": "record",
    "record_checkpoints": "record",
    "open_run": "store",
    "Run": "store",
    "FORMAT_VERSION": "store",
    "select_layers": "views",
    "LayerView": "views",
    "register_view": "views",
    "register_layer": "registry",
    "Matrix": "registry",
    "validate_run": "store.validate",
    "export_snapshot": "store",
    "build_model": "zoo",
    "load_dataset": "zoo",
    "TrainConfig": "train",
    "fit": "train",
    "AnalysisConfig": "analyze",
    "EngineConfig": "analyze",
    "Report": "analyze",
    "Plan": "recommend",
    "PlanConfig": "recommend",
    "OIALR": "train.oialr",
    "OIALRConfig": "train.oialr",
    "factorize_": "lowrank",
    "densify_": "lowrank",
    "FactorizeConfig": "lowrank",
    "export_factorized": "train.export",
    "compare_export": "train.export",
    "RecordJob": "jobs",
    "run_record_job": "jobs",
    "TrainJob": "jobs",
    "run_train_job": "jobs",
    "BstabError": "errors",
}
# Subpackages reachable as attributes; ``analyze`` is the subpackage (its function is
# ``basis_stability.analyze.analyze``), ``plots`` imports matplotlib only when asked for.
_SUBMODULES = ("analyze", "plots")

__all__ = ["__version__", *sorted(_API), *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'basis_stability' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
