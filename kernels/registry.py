"""The backends and how a name ("auto", "cpu", ...) becomes one for a device.

``_BACKENDS`` lists them: ``reference`` and ``torch`` always exist; ``cpu`` and ``triton`` say
per device whether they are available, and ``backend="auto"`` takes the first available one in
``_AUTO_ORDER``. An op a backend does not provide falls back to the "torch" one.

A backend marked ``inline`` is plain PyTorch code that tracers (torch.compile, torch.export, the
ONNX exporter) should see op by op: the public functions call it directly. Every other backend
runs inside the registered operators of ``ops.py``, which tracers see as single nodes.
"""

from __future__ import annotations

import torch

from . import cpu as _cpu
from . import reference as _reference
from . import torch_scan as _torch_scan

try:  # triton may fail to import on some platforms: the backend is then unavailable
    from . import triton as _triton
except ImportError:  # pragma: no cover
    _triton = None

__all__ = ["available_backends", "resolve_backend", "has_op", "own_op", "lookup", "is_inline", "BACKENDS"]


class _Backend:
    """The ops of one backend (None where it has none) and its availability test."""

    def __init__(self, is_available=None, takes_tuning=False, inline=False, **ops):
        self.is_available = is_available or (lambda device: True)
        self.takes_tuning = takes_tuning
        self.inline = inline
        self.ops = ops


_BACKENDS = {
    "reference": _Backend(inline=True,
                          selective_scan=_reference.selective_scan_reference,
                          cross_scan=_reference.cross_scan_reference,
                          cross_merge=_reference.cross_merge_reference),
    "torch": _Backend(selective_scan=_torch_scan.selective_scan_blocked,
                      cross_scan=_torch_scan.cross_scan_torch,
                      cross_merge=_torch_scan.cross_merge_torch),
    "triton": _Backend(is_available=_triton.is_available, takes_tuning=True,
                       selective_scan=_triton.selective_scan, cross_scan=_triton.cross_scan,
                       cross_merge=_triton.cross_merge, cross_selective_scan=_triton.cross_selective_scan)
    if _triton is not None else _Backend(is_available=lambda device: False),
    "cpu": _Backend(is_available=_cpu.is_available, selective_scan=_cpu.selective_scan,
                    cross_selective_scan=_cpu.cross_selective_scan),
}
BACKENDS = tuple(_BACKENDS)

# Preference order of backend="auto" per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


def _is_available(name: str, device: torch.device) -> bool:
    return bool(_BACKENDS[name].is_available(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable for tensors on ``device``."""
    device = torch.device(device)
    return [name for name in _BACKENDS if _is_available(name, device)]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn "auto" into a concrete backend for ``device``; check an explicit choice exists."""
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if _is_available(name, device):
                return name
        return "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose from {', '.join(('auto',) + BACKENDS)}")
    if not _is_available(backend, device):
        raise RuntimeError(f"scan backend {backend!r} is not available for {device.type} tensors here")
    return backend


def is_inline(backend: str) -> bool:
    """Whether ``backend`` (a name as given, "auto" included) runs as plain PyTorch code outside the
    registered operators. Decided from the name alone, so tracers need no device query."""
    entry = _BACKENDS.get(backend)
    return entry is not None and entry.inline


def has_op(backend: str, op: str) -> bool:
    """Whether the concrete backend ``backend`` has its own ``op`` (e.g. a fused
    "cross_selective_scan") rather than the "torch" fallback."""
    return own_op(backend, op) is not None


def own_op(backend: str, op: str):
    """The concrete backend's own ``op``, or None where it has none."""
    return _BACKENDS[backend].ops.get(op)


def lookup(op: str, backend: str, device: torch.device, tuning=None, fallback: bool = True):
    """The implementation of ``op`` for ``backend`` on ``device``, with the tuning bound where it
    applies; the "torch" op where the backend has none (None instead if not ``fallback``)."""
    chosen = _BACKENDS[resolve_backend(backend, device)]
    impl = chosen.ops.get(op)
    if impl is None:
        return _BACKENDS["torch"].ops.get(op) if fallback else None
    if chosen.takes_tuning and tuning is not None:
        return lambda *args, **kwargs: impl(*args, tuning=tuning, **kwargs)
    return impl
