"""One writer per run: an advisory lock on a sidecar file that dies with its process.

HDF5's own consistency flag cannot tell a live writer from a killed one (both leave it set), so
every process that writes a run (create, overwrite, append, recovery) first takes an exclusive
``flock`` on ``.RUN.h5.lock`` beside it and keeps it until it closes the run. The operating
system drops the lock when the process ends, however it ends (SIGKILL included), so a stale lock
never blocks anyone; while it is held, the file records the holder's pid, host, start time and
command line, which the refusal message names.

Example:
    >>> with WriterLock.acquire("runs/a.h5"):  # doctest: +SKIP
    ...     ...  # create, append to or recover runs/a.h5
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import RunFileError, RunLockedError
from .h5io import writer_flagged
from .paths import as_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, see WriterLock.acquire
    fcntl = None  # type: ignore[assignment]


def lock_path(run_path: str | os.PathLike) -> Path:
    """The sidecar lock file of a run: ``.NAME.lock`` in the run's folder."""
    path = Path(run_path)
    return path.with_name(f".{path.name}.lock")


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    cmd = holder.get("cmd", "")
    return (
        f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {since}"
        + (f": {cmd[:80]}" if cmd else "")
        + ")"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


class WriterLock:
    """An exclusive, process-lifetime lock on one run path. Use :meth:`acquire`."""

    def __init__(self, fd: int | None, path: Path, run_path: Path) -> None:
        self._fd = fd
        self._pid = os.getpid()  # a forked child (a DataLoader worker) must not release it
        self.path = path
        self.run_path = run_path

    @classmethod
    def acquire(cls, run_path: str | os.PathLike, action: str = "write") -> WriterLock:
        """Take the run's writer lock or raise :class:`RunLockedError` naming its holder.

        Args:
            run_path: the run file (it need not exist yet).
            action: what the caller is about to do, for the message ("append to", ...).

        Raises:
            RunLockedError: another process (or another writer in this one) holds the lock.
            RunFileError: the lock file cannot be created (an unwritable folder).
        """
        run_path = Path(run_path)
        path = lock_path(run_path)
        if fcntl is None:  # pragma: no cover - platforms without flock: no enforcement
            return cls(None, path, run_path)
        for _ in range(100):  # retried only when the lock file was replaced under us
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunFileError(
                    f"Cannot create the writer lock {path} ({exc.strerror}); the run's folder "
                    f"must be writable to {action} {run_path}. Choose a writable folder."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"Cannot {action} {run_path}: {_describe(holder)} is writing it. Wait for "
                    "it to finish (or stop it), or write to another path; nothing was changed."
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder released and removed it between our open and flock
                os.close(fd)
                continue
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.time(),
                "cmd": " ".join(sys.argv)[:500],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return cls(fd, path, run_path)
        raise RunFileError(f"Cannot take the writer lock {path}: it keeps being replaced.")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock and remove its file (idempotent)."""
        if self._fd is None:
            return
        if os.getpid() != self._pid:  # a fork's copy: the parent still writes; just let go
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            return
        with contextlib.suppress(OSError):  # unlinked while still locked: no one can lock
            os.unlink(self.path)  # the old inode after us
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lost writer object must not keep the run locked
        with contextlib.suppress(Exception):
            self.release()


def holder_of(run_path: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the run's writer lock now (pid, host, since, cmd), or None when nobody does."""
    path = lock_path(run_path)
    if fcntl is None or not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def live_status(run_path: str | os.PathLike) -> str | None:
    """Why a run may still change: a writer holds its lock (it is being recorded), or its file
    was left open (a writer died, or writes without the lock); None when closed cleanly (or
    missing: opening it names that problem).

    Raises:
        ConfigError: ``run_path`` is not a path (naming `path`, as :func:`open_run` does).

    Example:
        >>> live_status("runs/cnn-digits-seed0.h5")  # doctest: +SKIP
        'still being recorded by process 4242 on node7 since 2026-12-02 18:50:48 UTC'
    """
    run_path = as_path(run_path)  # a number or None: the ConfigError open_run gives
    if not run_path.is_file():
        return None
    holder = holder_of(run_path)
    if holder is not None:
        since = holder.get("since")
        when = ""
        if isinstance(since, (int, float)):
            stamp = dt.datetime.fromtimestamp(since, dt.timezone.utc)
            when = f" since {stamp:%Y-%m-%d %H:%M:%S} UTC"
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}{when}"
        return f"still being recorded by {who}"
    if writer_flagged(run_path):
        return "not closed cleanly: its writer still has it open, or died while writing"
    return None


def other_openers(path: str | os.PathLike) -> list[int]:
    """Pids of other processes that have ``path`` open (Linux ``/proc``; empty elsewhere)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    me, found = os.getpid(), []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
                found.append(int(entry.name))
                break
    return found
