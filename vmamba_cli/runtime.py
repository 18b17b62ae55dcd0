"""Where and how a command runs: the torch device, the torchrun process group, mixed precision.

Every command spells these the same way:

* ``--device auto|cpu|cuda|cuda:N`` -> :func:`select_device`.
* torchrun (``WORLD_SIZE`` > 1 in the environment) -> :func:`process_group`, which joins the group
  (nccl on CUDA, gloo on CPU), yields a :class:`Dist` and leaves the group on exit.
* ``--amp auto|none|bf16|fp16`` -> :func:`resolve_amp` and :func:`autocast`. ``auto`` is bf16 on a
  CUDA device that supports it and none (float32) elsewhere (:data:`AMP_HELP` is the help text).
* ``--resolution`` -> :func:`check_resolution` (bounds) and :func:`check_memory` (activations against
  the free memory of the device), before anything runs.
* output files and folders -> :func:`check_output_file` / :func:`check_output_dir`, before the work.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vmamba_cli.errors import InputError, PathError

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")
# Input sizes: the model divides the resolution by 32 (patch 4, then three downsamplings), and its
# padded convolutions keep at least one pixel per stage, so it runs at any size; below 8 pixels the
# patch embedding sees less than a 2x2 grid, and that is the floor predict, eval and train share (the
# digits model is trained at 32 and evaluated at 24-96, see docs/eval.md). At MAX_RESOLUTION one vmamba-tiny image already needs
# about 9 GiB of activations (activation_bytes); larger sizes are refused before anything is built.
MIN_RESOLUTION = 8
MAX_RESOLUTION = 4096
ACTIVATION_FACTOR = 24
TRAINING_FACTOR = 4
AMP_HELP = ("Mixed precision: auto (bf16 on a CUDA device with bf16 support, none elsewhere), "
            "none (float32), bf16 or fp16 (autocast).")


# -- device ----------------------------------------------------------------------------------------

def select_device(device: str | torch.device = "auto", *, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (Apple GPUs).

    A bare ``cuda`` becomes ``cuda:local_rank`` when a torchrun rank is given. Raises InputError (a
    ValueError) for any other string, for CUDA when none is present and for a CUDA index out of range.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device.strip().lower() == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        text = device.strip().lower() if isinstance(device, str) else device
        try:
            dev = torch.device(text)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        # torch also names device types that cannot run a model here (meta, xla, hpu ...).
        if dev is None or dev.type not in DEVICE_TYPES or (dev.type != "cuda" and dev.index not in (None, 0)):
            raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {dev} requested but no CUDA device is available (use --device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {dev} requested but only {count} CUDA device(s) exist "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % count)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device mps requested but this PyTorch has no MPS support (use --device cpu)")
    return dev


# -- input size and memory -----------------------------------------------------------------------------

def check_resolution(resolution: int | None, *, minimum: int = MIN_RESOLUTION, maximum: int = MAX_RESOLUTION,
                     name: str = "resolution") -> None:
    """Refuse an input size outside [minimum, maximum] pixels (None: the model's preset, always fine)."""
    if resolution is None:
        return
    if not minimum <= resolution <= maximum:
        raise InputError(f"{name} must be between {minimum} and {maximum} pixels, got {resolution}")


def activation_bytes(resolution: int, batch_size: int, width: int, patch_size: int = 4, *,
                     training: bool = False) -> int:
    """A lower-bound estimate of the memory one forward pass needs at ``resolution``.

    The rule: ``ACTIVATION_FACTOR`` float32 maps of the first stage (``width`` channels at
    ``resolution / patch_size``) per image; training keeps the activations for the backward pass,
    counted as ``TRAINING_FACTOR`` times that. Measured on vmamba-tiny (CPU, float32): the peak of a
    forward is 19-24 such maps at 448-896 pixels, of a forward and backward about 138 at 224 pixels
    (weights and gradients included), so the estimate errs low and only refuses sizes that cannot fit.
    """
    side = -(-resolution // patch_size)
    estimate = batch_size * side * side * width * 4 * ACTIVATION_FACTOR
    return estimate * TRAINING_FACTOR if training else estimate


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's free memory; CPU: Linux's MemAvailable), or None
    when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(resolution: int, batch_size: int, width: int, device: torch.device | str, *, patch_size: int = 4,
                 training: bool = False, options: str = "--resolution or --batch-size") -> None:
    """Refuse, before anything is allocated, a forward that ``activation_bytes`` says cannot fit in the
    memory available on ``device``."""
    need = activation_bytes(resolution, batch_size, width, patch_size, training=training)
    free = available_memory(device)
    if free is not None and need > free:
        raise InputError(f"{resolution}x{resolution} pixels x {batch_size} image(s) need at least "
                         f"{need / 2**30:.1f} GiB for {'training' if training else 'the forward pass'} but "
                         f"{torch.device(device)} has {free / 2**30:.1f} GiB available; lower {options}")


# -- output places ---------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe_writable(target: Path, folder: Path) -> None:
    """Create and remove a temporary file in ``folder``: the only test that also catches read-only
    mounts and pseudo file systems (/proc, /sys), where permission bits say nothing."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".vmamba-write-test.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PathError(target, f"cannot write in {folder} ({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (it is replaced if it exists):
    not a folder or a special file, and its folder exists or can be created, and is writable.
    Raises PathError naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise PathError(path, "is a folder (expected a file name)")
    if os.path.lexists(path) and path.exists() and not path.is_file():
        raise PathError(path, "exists and is not a regular file")
    existing = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not existing.is_dir():
        raise PathError(path, f"cannot create: {existing} is not a folder")
    _probe_writable(path, existing)
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check, before any work, that ``path`` is a folder, or can be created as one, and is writable.
    Raises PathError naming ``path``."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "exists and is not a folder" if existing == path else f"cannot create: {existing} is not a folder"
        raise PathError(path, where)
    _probe_writable(path, existing)
    return path


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


__all__ = ["AMP_CHOICES", "AMP_HELP", "MAX_RESOLUTION", "MIN_RESOLUTION", "Dist", "activation_bytes", "amp_name",
           "autocast", "available_memory", "check_memory", "check_output_dir", "check_output_file",
           "check_resolution", "group_initialized", "launched_by_torchrun", "process_group", "resolve_amp",
           "select_device"]
