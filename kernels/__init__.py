"""Selective scan, cross-scan and cross-merge with interchangeable backends.

Every op has a slow, obviously-correct reference (the test oracle) and faster forms side by side::

    selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto")
    cross_scan(x, backend="auto")              (B, D, H, W)    -> (B, 4, D, H*W)
    cross_merge(ys, backend="auto")            (B, 4, D, H, W) -> (B, D, H, W)
    cross_selective_scan(x, ...)               the whole SS2D core: scan orders, projections,
                                               selective scan and merge (a fused kernel may
                                               replace the composition)

This package is the bottom layer: it imports nothing from the rest of ``vmamba_cli``.

    common.py      shapes, NUM_DIRECTIONS, empty inputs          flops.py    the scan's FLOP mark
    reference.py   sequential scan, index-table cross ops        compose.py  SS2D core from ops
    torch_scan.py  backend "torch": blocked scan, flip/transpose cross ops
    cpu/           backend "cpu": native C++ scan (build, work split, autograd ops)
    triton/        backend "triton": Triton kernels (see its __init__)

Backends are listed in ``_BACKENDS``: ``reference`` and ``torch`` always exist; ``cpu`` and
``triton`` say per device whether they are available, and ``backend="auto"`` takes the first
available one in ``_AUTO_ORDER``. An op a backend does not provide falls back to the "torch" one.
``tuning`` (a ``triton.TritonTuning``) reaches the Triton backend; the others ignore it.
"""

from __future__ import annotations

import torch

from . import cpu as _cpu
from . import reference as _reference
from . import torch_scan as _torch_scan
from .common import NUM_DIRECTIONS
from .compose import compose_ops
from .flops import in_dispatch_mode, mark_selective_scan

try:  # triton may fail to import on some platforms: the backend is then unavailable
    from . import triton as _triton
except ImportError:  # pragma: no cover
    _triton = None

__all__ = [
    "selective_scan", "cross_scan", "cross_merge", "cross_selective_scan", "compose_cross_selective_scan",
    "available_backends", "resolve_backend", "has_op", "BACKENDS", "NUM_DIRECTIONS",
]


class _Backend:
    """The ops of one backend (None where it has none) and its availability test."""

    def __init__(self, is_available=None, takes_tuning=False, **ops):
        self.is_available = is_available or (lambda device: True)
        self.takes_tuning = takes_tuning
        self.ops = ops


_BACKENDS = {
    "reference": _Backend(selective_scan=_reference.selective_scan_reference,
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


def has_op(backend: str, op: str) -> bool:
    """Whether the concrete backend ``backend`` has its own ``op`` (e.g. a fused
    "cross_selective_scan") rather than the "torch" fallback."""
    return _BACKENDS[backend].ops.get(op) is not None


def _op(backend: str, op: str):
    """The backend's own ``op`` or None (prefer ``has_op``)."""
    return _BACKENDS[backend].ops.get(op)


def _lookup(op: str, backend: str, device: torch.device, tuning=None, fallback: bool = True):
    """The implementation of ``op`` for ``backend`` on ``device``, with the tuning bound where it
    applies; the "torch" op where the backend has none (None instead if not ``fallback``)."""
    chosen = _BACKENDS[resolve_backend(backend, device)]
    impl = chosen.ops.get(op)
    if impl is None:
        return _BACKENDS["torch"].ops.get(op) if fallback else None
    if chosen.takes_tuning and tuning is not None:
        return lambda *args, **kwargs: impl(*args, tuning=tuning, **kwargs)
    return impl


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto",
                   output_dtype=torch.float32, tuning=None):
    """Selective scan with VMamba's shapes (docs/design.md §5.1); float32 state, float32 output by default.

    u, delta: (batch, K*D, L); A: (K*D, N); B, C: (batch, K, N, L), each group shared by D channels;
    D, delta_bias: (K*D,). Differentiable with respect to every tensor input.
    """
    impl = _lookup("selective_scan", backend, u.device, tuning)
    y = impl(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype=output_dtype)
    return mark_selective_scan(y, A.shape[1])


def cross_scan(x: torch.Tensor, backend: str = "auto", tuning=None) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W) in the four scan orders."""
    return _lookup("cross_scan", backend, x.device, tuning)(x)


def cross_merge(ys: torch.Tensor, backend: str = "auto", tuning=None) -> torch.Tensor:
    """(B, 4, D, H, W) -> (B, D, H, W): the sum of the four directions read back at each pixel."""
    return _lookup("cross_merge", backend, ys.device, tuning)(ys)


def compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 backend="auto", tuning=None):
    """The SS2D core from separate ops (what a fused kernel must reproduce).

    x: (B, Di, H, W) after the depthwise conv and SiLU. Returns (B, Di, H, W) in float32.
    """
    device = x.device
    return compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                       scan=_lookup("selective_scan", backend, device, tuning),
                       cross_scan=_lookup("cross_scan", backend, device, tuning),
                       cross_merge=_lookup("cross_merge", backend, device, tuning))


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend="auto",
                         tuning=None):
    """SS2D core: cross-scan, x/dt projections, selective scan with softplus, cross-merge."""
    fused = _lookup("cross_selective_scan", backend, x.device, tuning, fallback=False)
    # Under a dispatch mode (FlopCounterMode, fake tensors) the separate ops run instead, so that
    # counters see the projections and the marked scan; the result is the same.
    if fused is not None and not in_dispatch_mode():
        return fused(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    return compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend,
                                        tuning)
