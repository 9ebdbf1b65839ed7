"""Which torch device a name means: the one check of a ``device`` argument."""

from __future__ import annotations

import re

import torch

from .errors import ConfigError, expected

_NAME = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(name: str, allow_auto: bool = True) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or ``"auto"``: CUDA when visible, else the CPU) as a
    :class:`torch.device`.

    Raises:
        ConfigError: naming ``device``: not such a name, or a CUDA device none of which is
            visible here.
    """
    if allow_auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        choices = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
        raise ConfigError(expected("device", choices, name, 'Use `device="cpu"`.'))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            expected(
                "device",
                "an available device",
                name,
                'No CUDA GPU is visible here; use `device="cpu"`.',
            )
        )
    return torch.device(name)
