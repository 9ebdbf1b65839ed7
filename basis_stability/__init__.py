"""basis_stability: record how a network's weight bases settle during training, analyse it, and
exploit it to train low-rank (OIALR).

The stages, in the order the data flows::

    recording/  ->  store/  ->  analysis/  ->  recommend/  ->  lowrank/, training/  ->  exporting/

The public API is a few verbs and the nouns they take and return, imported lazily so that
``import basis_stability`` stays light (no h5py, matplotlib or click until used)::

    import basis_stability as bs
    with bs.record(model, "run.h5", schedule=bs.every(100)) as rec: ...
    report = bs.analyze("run.h5")
    comparison = bs.compare(["full.h5", "oialr.h5"])
    history = bs.train(model, data, bs.TrainConfig(epochs=30), oialr=report.plan)
    compact = bs.export(model)
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from . import _compat

__version__ = "0.1.0"

_compat.install()

# name -> the module that defines it
_API = {
    # verbs
    "record": "api",
    "analyze": "api",
    "compare": "api",
    "train": "api",
    "export": "api",
    "export_snapshot": "exporting.snapshot",
    "html_report": "reporting.page",
    # nouns
    "Recorder": "recording.recorder",
    "every": "recording.schedules",
    "open_run": "store.reader",
    "Run": "store.reader",
    "Report": "analysis.report",
    "Comparison": "analysis.compare",
    "Plan": "recommend.plan",
    "OIALR": "training.oialr",
    "register_layer": "registry",
    "Matrix": "registry",
    "validate_run": "store.validate",
    "BstabError": "errors",
    # configs
    "RecordConfig": "recording.recorder",
    "LiveStability": "analysis.live",
    "AnalysisConfig": "analysis.report",
    "EngineConfig": "analysis.config",
    "PlanConfig": "recommend.plan",
    "TrainConfig": "training.loop",
    "OIALRConfig": "training.oialr",
}
# the names 0.1 exported at the top level that now live in their stage: still reachable here,
# with a DeprecationWarning naming the new home
_MOVED = {
    "RecordJob": "jobs",
    "run_record_job": "jobs",
    "TrainJob": "jobs",
    "run_train_job": "jobs",
    "every_epoch": "recording",
    "at": "recording",
    "logspaced": "recording",
    "record_checkpoints": "recording",
    "FORMAT_VERSION": "store",
    "select_layers": "views",
    "LayerView": "views",
    "register_view": "views",
    "build_model": "zoo",
    "load_dataset": "zoo",
    "fit": "training",
    "factorize_": "lowrank",
    "densify_": "lowrank",
    "FactorizeConfig": "lowrank",
    "export_factorized": "exporting",
    "compare_export": "exporting",
}
# subpackages reachable as attributes; ``plots`` (one run) and ``plots_compare`` (several runs)
# import matplotlib only when asked for
_SUBMODULES = ("plots", "plots_compare", "zoo")

__all__ = ["__version__", *sorted(_API), *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MOVED:
        where = f"{__name__}.{_MOVED[name]}"
        warnings.warn(
            f"basis_stability.{name} is not part of the public API any more; import it from "
            f"{where}. The top-level name will go in 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'basis_stability' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
