"""What a snapshot stores besides its matrices: the model's small state (biases, norm weights,
buffers), which entries it is (:func:`plan_state`) and how one dtype's row is packed
(:func:`state_storage`). The on-disk side is :mod:`basis_stability.store.state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..store import state as st
from ..views import LayerView

STATE_TORCH = {name: getattr(torch, name) for name in st.DTYPES}  # "float32" -> torch.float32
STATE_NAMES = {dtype: name for name, dtype in STATE_TORCH.items()}


@dataclass
class StatePlan:
    """What a snapshot of a model stores besides its matrices (see :func:`plan_state`).

    Attributes:
        entries: ``(key, dtype, shape)`` of every small entry: 0-D or 1-D, not a recorded matrix.
        model: every key of the model's ``state_dict()`` with its shape and dtype.
        tied: keys whose tensor is another key's (a head tied to an embedding) -> that key.
        skipped: ``(key, reason)`` of small entries that cannot be stored.
    """

    entries: list[tuple[str, str, tuple[int, ...]]]
    model: list[st.ModelKey]
    tied: dict[str, str]
    skipped: list[tuple[str, str]]


def plan_state(model: nn.Module, views: Sequence[LayerView]) -> StatePlan:
    """The small state of ``model`` (bare, unwrapped) that a snapshot stores with ``views``.

    Every ``state_dict()`` entry that is 0-D or 1-D (biases, norm weights, running statistics,
    ``num_batches_tracked``) and not a recorded matrix; larger unrecorded tensors (an unselected
    embedding) are not stored, and an export names them as missing.

    Example:
        >>> from basis_stability.views import select_layers
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> [key for key, _, _ in plan_state(m, select_layers(m).views).entries]
        ['0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']
    """
    sd = model.state_dict(keep_vars=True)  # the tensors themselves: ties keep their identity
    recorded = {v.param_name for v in views}
    owner: dict[int, str] = {}  # id(tensor) -> the key it is stored under
    for key in [k for k in sd if k in recorded] + list(sd):
        if isinstance(sd[key], torch.Tensor):
            owner.setdefault(id(sd[key]), key)
    plan = StatePlan([], [], {}, [])
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            plan.model.append(st.ModelKey(key, None, type(value).__name__))
            plan.skipped.append((key, f"not a tensor ({type(value).__name__})"))
            continue
        dtype = STATE_NAMES.get(value.dtype, str(value.dtype).removeprefix("torch."))
        plan.model.append(st.ModelKey(key, tuple(value.shape), dtype))
        if owner[id(value)] != key:
            plan.tied[key] = owner[id(value)]
        elif key in recorded or value.dim() > 1:
            continue
        elif value.numel() == 0:
            plan.skipped.append((key, "empty (an export recreates it from its shape)"))
        elif value.dtype not in STATE_NAMES:
            plan.skipped.append((key, f"dtype {dtype} cannot be stored"))
        elif resolve_or_none(model, key.split(".")) is not value:
            plan.skipped.append((key, "not an attribute of its module (a state-dict hook?)"))
        else:
            plan.entries.append((key, dtype, tuple(value.shape)))
    return plan


def resolve_or_none(model: nn.Module, parts: Sequence[str]) -> Any:
    """``model.<parts...>`` (a state-dict key split at its dots), or None. Reads the modules'
    own tables first: five times faster than ``getattr`` through ``nn.Module.__getattr__``, which
    counts at hundreds of entries per snapshot."""
    obj: Any = model
    try:
        for part in parts[:-1]:
            children = getattr(obj, "_modules", None)
            obj = (
                children[part] if children is not None and part in children else getattr(obj, part)
            )
        last = parts[-1]
        for table in ("_parameters", "_buffers"):
            own = getattr(obj, table, None)
            if own is not None and last in own:
                return own[last]
        return getattr(obj, last)
    except AttributeError:
        return None


def state_storage(parts: Sequence[torch.Tensor], dtype: str) -> np.ndarray:
    """One dtype's packed state row in host memory, bit for bit (bfloat16 as uint16 bits, bool
    as uint8); GPU tensors are concatenated there and copied once."""
    with torch.no_grad():
        flat = torch.cat(list(parts)) if len(parts) > 1 else parts[0].detach().reshape(-1)
        flat = flat.to("cpu")
        if dtype == "bfloat16":
            return flat.view(torch.int16).numpy().view(np.uint16)
        if dtype == "bool":
            return flat.view(torch.uint8).numpy()
        return flat.numpy()
