"""Choosing the torch device from a user's --device value."""

from __future__ import annotations

import torch


def select_device(device: str | torch.device = "auto", *, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    A bare ``cuda`` becomes ``cuda:local_rank`` when a torchrun rank is given. Raises ValueError when
    CUDA is requested but absent.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but no CUDA device is available (use --device cpu)")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev
