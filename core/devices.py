"""Which torch device a stage runs on: one rule for the cache pass and for training (`device: auto|cpu|cuda`)."""

from __future__ import annotations

from typing import Literal

import torch

from distill.core.errors import InputError

DeviceChoice = Literal["auto", "cpu", "cuda"]


class DeviceError(InputError):
    """`device: cuda` was asked for on a host where torch sees no CUDA device."""


def resolve_device(choice: DeviceChoice, local_rank: int = 0) -> torch.device:
    """auto = the local rank's GPU when CUDA is available, else the CPU; cuda without a GPU is a config error."""
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise DeviceError("device: cuda, but torch sees no CUDA device on this host; set device: auto or cpu")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    return torch.device("cuda", local_rank % count if count else 0)
