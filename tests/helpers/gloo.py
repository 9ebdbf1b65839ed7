"""The process group of the 2-process gloo tests: one place for how a spawned rank joins it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


@contextmanager
def gloo_group(rank: int, folder: str, world: int, name: str = "rendezvous") -> Iterator[None]:
    """Join a ``world``-rank gloo group for the body, one thread per rank, then leave it.

    Rendezvous goes through a file in ``folder``, not a TCP port picked in advance (no port race
    with other processes), over loopback only, and with a bounded timeout: a rank that dies must
    not leave the other waiting long.
    """
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/{name}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank done before any tears down: a rank leaving while another still talks to it
    # aborted the other now and then ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
