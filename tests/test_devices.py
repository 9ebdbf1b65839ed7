"""Which torch device a name means (devices.py): the one check of every ``device`` argument."""

from __future__ import annotations

import pytest
import torch

from basis_stability.devices import resolve_device
from basis_stability.errors import ConfigError

CUDA = torch.cuda.is_available()


def test_cpu_and_auto_name_the_device_this_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("name", ["tpu", "CPU", "cuda:x", "cuda:", "gpu", "", 0, None])
def test_names_that_are_no_device_are_config_errors_naming_device(name):
    with pytest.raises(ConfigError, match="`device`") as caught:
        resolve_device(name)
    assert "device" in caught.value.arguments


def test_auto_is_refused_where_it_is_not_allowed():
    with pytest.raises(ConfigError, match="cpu, cuda, cuda:N") as caught:
        resolve_device("auto", allow_auto=False)
    assert "auto" not in str(caught.value).split("but got")[0]  # not offered as a choice


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_is_that_device_when_visible_and_a_clear_error_when_not(name: str):
    if CUDA:
        assert resolve_device(name) == torch.device(name)
    else:
        with pytest.raises(ConfigError, match="No CUDA GPU is visible"):
            resolve_device(name)
