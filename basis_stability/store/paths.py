"""Output paths: the one refusal of a path that already exists (a run file, an exported
snapshot or model), and the one atomic write of an exported file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError, Message, RunExistsError, expected, names_in


def as_path(value: object, argument: str = "path") -> Path:
    """``value`` as a :class:`~pathlib.Path`, if it names a file (a ``str`` or ``os.PathLike``).

    Raises:
        ConfigError: anything else (a number, None, an open file), naming ``argument``.

    Example:
        >>> as_path("runs/a.h5")
        PosixPath('runs/a.h5')
    """
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ConfigError(
        expected(
            argument,
            "a file path (str or pathlib.Path)",
            value,
            'Pass the path of the file, e.g. "runs/run.h5".',
        )
    )


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


def write_atomically(
    out: str | os.PathLike, write: Callable[[Path], object], *, force: bool, argument: str
) -> Path:
    """``write(tmp)`` into a temporary file beside ``out``, then move it into place.

    A reader never sees a half-written ``out``, and an interrupted write leaves no file. Without
    ``force`` the move is a hard link, which never replaces a file that appeared meanwhile (on a
    file system without hard links: check, then move).

    Args:
        out: the file to write; its folder is created.
        write: writes the whole file to the path it is given.
        force: replace an existing ``out``.
        argument: the argument that named ``out``, for the refusal's message.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        RunExistsError: ``out`` exists (or appeared during the write) and ``force`` is false;
            it is left untouched.
    """
    out = Path(out)
    fix = Message(f"Pass `force=True` to overwrite it, or choose another `{argument}`", ["force"])
    if not force:
        refuse_existing(out, argument, fix)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
        if force:
            os.replace(tmp, out)
            return out
        try:
            os.link(tmp, out)
            return out
        except FileExistsError:
            raise RunExistsError(
                f"{out} appeared while it was being written; nothing was overwritten. {fix}.",
                argument=(argument, "force"),
            ) from None
        except OSError:  # a file system without hard links
            pass
        refuse_existing(out, argument, fix)
        os.replace(tmp, out)
        return out
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux), else by the
    classic set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
