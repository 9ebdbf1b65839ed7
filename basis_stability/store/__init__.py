"""Store: the versioned, crash-safe HDF5 run file (writer, lazy reader, validator, export)."""

from .export import export_snapshot
from .format import FORMAT_NAME, FORMAT_VERSION
from .reader import LayerInfo, LayerSnapshots, Run, open_run
from .writer import RunWriter, recover

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerInfo",
    "LayerSnapshots",
    "Run",
    "RunWriter",
    "export_snapshot",
    "open_run",
    "recover",
]
