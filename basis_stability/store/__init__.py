"""Store: the versioned, crash-safe HDF5 run file (writer, lazy reader, validator)."""

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
    "open_run",
    "recover",
]


def __getattr__(name: str):
    from .._compat import moved_attribute

    return moved_attribute(__name__, name)
