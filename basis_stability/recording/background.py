"""Snapshots written off the training thread (``RecordConfig(background=True)``, the default).

::

    training thread   snapshot(): copy every layer and state row into its reused host buffer
                      -> wait for the write in flight -> check the disk -> hand over -> return
    writer thread     RunWriter.append(buffers): rows, flush, commit, flush (the same protocol)

One snapshot is in flight at most: a snapshot is handed over only once the one before it is
committed, so a run never holds more than one uncommitted snapshot and a SIGKILL loses at most
that one. Buffers are never written while the writer reads them: a snapshot taken while the one
before is still being written is copied into a second set (allocated the first time this
happens), so the copy overlaps that write. The copy is complete when :meth:`Recorder.snapshot`
returns, so the training may change the weights at once.

h5py releases the GIL inside its HDF5 calls (``write_direct``, ``flush``), so the writer thread
does not stop the training thread's Python while the bytes go out. Measured with h5py 3.16 and
HDF5 2.0 (``benchmarks/record_overhead.py`` part (c)): a pure-Python loop on the training thread
paused at most 0.6-1.4 ms during a 0.6-0.9 s ``write_direct`` of 128 MiB with fletcher32. The
Python between those calls (h5py's wrappers, the commit) does hold the GIL: while the recorder
wrote snapshots of 8 x 512^2 floats back to back, the loop's longest pause was 3-9 ms (CPython
hands the GIL over every 5 ms at the latest), on a 2-core machine shared with other work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A host tensor's memory as the numpy array the writer stores (bfloat16 as its raw uint16
    bits, bool as uint8), without a copy."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8).numpy()
    return tensor.numpy()


class HostBuffers:
    """One host buffer per recorded layer and per state dtype, allocated at first use and reused
    by every snapshot.

    A buffer that receives a CUDA tensor is page-locked (pinned) and filled by an asynchronous
    copy; :meth:`ready` waits for those copies. Tensors on the CPU (or another device) are copied
    at once.

    Example:
        >>> bufs = HostBuffers()
        >>> row = bufs.copy("w", torch.ones(3, 2), torch.float32)  # (3, 2) numpy view
        >>> bufs.ready()
    """

    def __init__(self) -> None:
        # key -> (host tensor, its numpy view, pinned)
        self._held: dict[Any, tuple[torch.Tensor, np.ndarray, bool]] = {}
        self._devices: set[torch.device] = set()  # CUDA devices with copies in progress

    def _buffer(
        self, key: Any, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool
    ) -> tuple[torch.Tensor, np.ndarray]:
        held = self._held.get(key)
        if held is None or held[0].shape != shape or held[0].dtype != dtype or held[2] != pinned:
            tensor = torch.empty(shape, dtype=dtype, pin_memory=pinned)
            held = (tensor, numpy_view(tensor), pinned)
            self._held[key] = held
        return held[0], held[1]

    def copy(self, key: Any, source: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        """Copy ``source`` (any device, any layout) into buffer ``key``, converted to ``dtype``
        as ``Tensor.to`` converts; returns the buffer's numpy view."""
        cuda = source.device.type == "cuda"
        tensor, array = self._buffer(key, tuple(source.shape), dtype, pinned=cuda)
        tensor.copy_(source, non_blocking=cuda)
        if cuda:
            self._devices.add(source.device)
        return array

    def copy_array(self, key: Any, source: np.ndarray) -> np.ndarray:
        """Copy a host array (any strides) into buffer ``key`` of its dtype; returns the buffer.
        For small CPU layers numpy's copy costs a fraction of torch's dispatch."""
        held = self._held.get(key)
        if held is None or held[1].shape != source.shape or held[1].dtype != source.dtype:
            array = np.empty(source.shape, source.dtype)
            held = (torch.from_numpy(array), array, False)
            self._held[key] = held
        np.copyto(held[1], source)
        return held[1]

    def pack(self, key: Any, parts: Sequence[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
        """Concatenate 1-D ``parts`` (all of ``dtype``) into buffer ``key``: one packed row."""
        if len(parts) == 1:
            return self.copy(key, parts[0].reshape(-1), dtype)
        if all(part.device.type == "cpu" for part in parts):
            width = sum(part.numel() for part in parts)
            tensor, array = self._buffer(key, (width,), dtype, pinned=False)
            torch.cat(list(parts), out=tensor)
            return array
        return self.copy(key, torch.cat(list(parts)), dtype)  # on the device: one transfer

    def ready(self) -> None:
        """Wait for the asynchronous device-to-host copies: then every buffer holds its values."""
        for device in self._devices:
            torch.cuda.current_stream(device).synchronize()
        self._devices.clear()


class WriterThread:
    """Runs writer operations one at a time, in the order handed over, on one background thread.

    An operation that raises is kept and re-raised on the training thread by the next
    :meth:`wait` or :meth:`check`, once; operations handed over after it, before it was raised,
    are skipped (nothing is written after a failure that nobody has seen yet). The thread never
    prints a traceback of its own.
    """

    def __init__(self, name: str = "bstab-writer") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._last: Future | None = None
        self._error: BaseException | None = None  # the first unreported failure
        self._lock = threading.Lock()  # guards _error, set here and taken there

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` after every operation handed over before."""
        self._last = self._pool.submit(self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        with self._lock:
            if self._error is not None:
                return
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # kept for the training thread, which re-raises it
            with self._lock:
                self._error = exc

    @property
    def busy(self) -> bool:
        """Whether an operation handed over is still running (or queued)."""
        return self._last is not None and not self._last.done()

    def wait(self) -> None:
        """Block until every operation handed over is done; re-raise a failure among them."""
        if self._last is not None:
            self._last.result()  # _run never raises
            self._last = None
        self.check()

    def check(self) -> None:
        """Re-raise a failure of an operation that has already ended (without waiting)."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the operations handed over, then end the thread (its failures are dropped:
        call :meth:`wait` first to see them)."""
        self._pool.shutdown(wait=True)
