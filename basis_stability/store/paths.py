"""The one refusal of an output path that already exists (a run file, an exported snapshot)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RunExistsError, names_in


def refuse_existing(path: str | os.PathLike, argument: str, fix: str) -> None:
    """Raise :class:`RunExistsError` when ``path`` exists; do nothing otherwise.

    Args:
        path: the file about to be created.
        argument: the argument (or command-line option) that named it, e.g. ``path``.
        fix: what to do instead, one clause without a final period (``Pass `force=True` to
            ...``); the message ends with "; nothing was written.". A
            :class:`~basis_stability.errors.Message` passes on the arguments it names.

    Raises:
        RunExistsError: ``path`` exists; the message names the argument, the path and the fix.

    Example:
        >>> refuse_existing("no/such/file.h5", "path", "Choose another path")
    """
    path = Path(path)
    if path.exists():
        raise RunExistsError(
            f"Expected `{argument}` to be a new file but {path} already exists. {fix}; "
            "nothing was written.",
            argument=(argument, *names_in(fix)),
        )
