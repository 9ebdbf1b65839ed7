"""Who writes files under torch.distributed (_dist.py), outside a process group: rank 0 of a
world of one, which writes and broadcasts to itself. (Under gloo: test_analyze_distributed.py,
test_oialr_distributed.py.)"""

from __future__ import annotations

import torch.distributed as dist

from basis_stability import _dist


def test_without_a_process_group_this_process_is_the_only_rank_and_the_writer():
    assert not (dist.is_available() and dist.is_initialized())
    assert (_dist.rank(), _dist.world_size(), _dist.is_writer()) == (0, 1, True)


def test_broadcast_without_a_group_returns_the_value_itself():
    value = {"plan": [1, 2, 3]}
    assert _dist.broadcast_object(value) is value
