"""The package's small error hierarchy.

Every message follows one template: what was expected, what was got, and one sentence on the fix,
e.g. ``Expected `dtype` to be one of float32, float16, bfloat16 but got 'int8'. Pick one of those.``
The CLI turns any :class:`BstabError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class BstabError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(BstabError, ValueError):
    """An argument or option has a value the package cannot use."""


class NoEligibleLayersError(BstabError, ValueError):
    """Layer selection matched nothing; the message lists the candidates."""


class RunFileError(BstabError, OSError):
    """A run file is missing, unreadable, foreign, truncated or of an unsupported version."""


class RunExistsError(RunFileError, FileExistsError):
    """Refusing to overwrite an existing run file."""


class RunMismatchError(RunFileError):
    """An existing run does not match the layers being recorded into it."""


class RunLockedError(RunFileError):
    """Another process is writing the run (it holds the run's writer lock)."""


class DamagedRunError(RunFileError):
    """A run's data fails its checksum or contradicts its own metadata."""


class WriteFailedError(RunFileError):
    """Writing a snapshot failed (a full disk, an I/O error); earlier snapshots are kept."""


class CheckpointError(BstabError, ValueError):
    """A set of checkpoints cannot be turned into a run."""


def expected(arg: str, wanted: str, got: object, fix: str) -> str:
    """Format the package's one error-message template.

    Example:
        >>> expected("every", "a positive integer", 0, "Use 1 to snapshot every step.")
        'Expected `every` to be a positive integer but got 0. Use 1 to snapshot every step.'
    """
    return f"Expected `{arg}` to be {wanted} but got {got!r}. {fix}"
