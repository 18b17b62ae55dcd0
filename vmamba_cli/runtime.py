"""Where and how a command runs: the torch device, the torchrun process group, mixed precision.

Every command spells these the same way:

* ``--device auto|cpu|cuda|cuda:N`` -> :func:`select_device`.
* torchrun (``WORLD_SIZE`` > 1 in the environment) -> :func:`process_group`, which joins the group
  (nccl on CUDA, gloo on CPU), yields a :class:`Dist` and leaves the group on exit.
* ``--amp auto|none|bf16|fp16`` -> :func:`resolve_amp` and :func:`autocast`. ``auto`` is bf16 on a
  CUDA device that supports it and none (float32) elsewhere (:data:`AMP_HELP` is the help text).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_HELP = ("Mixed precision: auto (bf16 on a CUDA device with bf16 support, none elsewhere), "
            "none (float32), bf16 or fp16 (autocast).")


# -- device ----------------------------------------------------------------------------------------

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
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} requested but no CUDA device is available (use --device cpu)")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


# -- precision -------------------------------------------------------------------------------------

def resolve_amp(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value on ``device``; None means float32 (no autocast)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    device = torch.device(device)
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """``none``, ``bf16`` or ``fp16``: the ``--amp`` spelling of an autocast dtype."""
    for name, value in AMP_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no --amp value for {dtype}")


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on the device's type, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# -- processes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) job, with the collectives the app needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum of ``values`` over the processes, in float64 (exact for counts below 2**53)."""
        if not self.enabled:
            return [float(v) for v in values]
        return self.all_reduce_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def all_reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the processes (on the device nccl needs, or on the CPU for gloo)."""
        if not self.enabled:
            return tensor
        device = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        tensor = tensor.to(device).clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _place(device: str | torch.device, local_rank: int | None) -> torch.device:
    dev = select_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto", *, distributed: bool | None = None) -> Iterator[Dist]:
    """The job this process belongs to, as a :class:`Dist` on the chosen device.

    ``distributed=None`` joins the group torchrun describes in the environment (``WORLD_SIZE`` > 1; gloo
    on CPU, nccl on CUDA) and leaves it on exit; a group the caller already created is reused and left
    open. ``distributed=False``, or a plain single process, yields a one-process Dist.
    """
    if distributed is None:
        distributed = launched_by_torchrun() or group_initialized()
    if not distributed:
        yield Dist(device=_place(device, None))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _place(device, local_rank)
    if group_initialized():
        yield Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)
        return
    if "MASTER_ADDR" not in os.environ:
        raise ValueError("WORLD_SIZE is set but not MASTER_ADDR: launch multi-process runs with "
                         "`torchrun --nproc-per-node N -m vmamba_cli ...`")
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)
    finally:
        torch.distributed.destroy_process_group()


__all__ = ["AMP_CHOICES", "AMP_HELP", "Dist", "amp_name", "autocast", "group_initialized",
           "launched_by_torchrun", "process_group", "resolve_amp", "select_device"]
