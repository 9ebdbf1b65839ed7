"""Export: what leaves the toolkit. A trained low-rank model as compact layers
(:func:`export_factorized`, checked by :func:`compare_export`), or one recorded snapshot as a
checkpoint the model loads (:func:`export_snapshot`).

Names are imported on first use, so exporting a snapshot does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "ExportReport": "factorized",
    "compare_export": "factorized",
    "count_macs": "factorized",
    "export_factorized": "factorized",
    "SnapshotExport": "snapshot",
    "default_output": "snapshot",
    "export_snapshot": "snapshot",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
