"""Record: snapshot layer weights during training (or from checkpoints) into a run file."""

from .checkpoints import find_checkpoints, record_checkpoints
from .config import RecordConfig
from .recorder import Recorder
from .schedules import Schedule, at, every, every_epoch, logspaced, parse_schedule

__all__ = [
    "RecordConfig",
    "Recorder",
    "Schedule",
    "at",
    "every",
    "every_epoch",
    "find_checkpoints",
    "logspaced",
    "parse_schedule",
    "record_checkpoints",
]
