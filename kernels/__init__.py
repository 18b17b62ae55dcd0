"""Selective scan, cross-scan and cross-merge with interchangeable backends.

Every op has a slow, obviously-correct reference (the test oracle) and faster forms side by side::

    selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto")
    cross_scan(x, backend="auto")              (B, D, H, W)    -> (B, 4, D, H*W)
    cross_merge(ys, backend="auto")            (B, 4, D, H, W) -> (B, D, H, W)
    cross_selective_scan(x, ...)               the whole SS2D core: scan orders, projections,
                                               selective scan and merge (a fused kernel may
                                               replace the composition)

Backends are named modules: ``reference`` and ``torch`` always exist; more (a GPU or a native CPU
kernel) are listed in ``_BACKENDS`` and are used by ``backend="auto"`` when their module says they
are available for the tensor's device.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .cross_scan import (NUM_DIRECTIONS, cross_merge_reference, cross_merge_torch,
                         cross_scan_reference, cross_scan_torch)
from .scan_torch import selective_scan_blocked, selective_scan_reference

# Registers the scan with torch.utils.flop_counter; the mark is an identity unless a dispatch mode
# (e.g. FlopCounterMode) is active.
from vmamba_cli.flops import in_dispatch_mode, mark_selective_scan  # noqa: E402

__all__ = [
    "selective_scan", "cross_scan", "cross_merge", "cross_selective_scan",
    "available_backends", "resolve_backend", "BACKENDS", "NUM_DIRECTIONS",
]

# name -> module (relative to this package) implementing the op set. A backend module may define
# ``selective_scan``, ``cross_scan``, ``cross_merge``, ``cross_selective_scan`` (any subset) and
# ``is_available(device: torch.device) -> bool``. Missing ops fall back to the "torch" backend.
_BACKENDS = {
    "reference": None,
    "torch": None,
    "triton": ".scan_triton",
    "cpu": ".scan_cpu",
}
# Standard-ops chunked closed form for exporters (ONNX, torch.export); "auto" never picks it.
_BACKENDS["chunked"] = ".chunked"
BACKENDS = tuple(_BACKENDS)

# Preference order of backend="auto" per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}

_BUILTIN = {
    "reference": {
        "selective_scan": selective_scan_reference,
        "cross_scan": cross_scan_reference,
        "cross_merge": cross_merge_reference,
    },
    "torch": {
        "selective_scan": selective_scan_blocked,
        "cross_scan": cross_scan_torch,
        "cross_merge": cross_merge_torch,
    },
}


@functools.lru_cache(maxsize=None)
def _module(name: str):
    path = _BACKENDS[name]
    if path is None:
        return None
    try:
        return importlib.import_module(path, __name__)
    except ImportError:
        return None


def _is_available(name: str, device: torch.device) -> bool:
    if name in _BUILTIN:
        return True
    module = _module(name)
    return module is not None and bool(module.is_available(device))


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


def _op(backend: str, op: str):
    if backend in _BUILTIN:
        return _BUILTIN[backend].get(op)
    return getattr(_module(backend), op, None)


def _lookup(op: str, backend: str, device: torch.device):
    name = resolve_backend(backend, device)
    return _op(name, op) or _BUILTIN["torch"][op]


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto",
                   output_dtype=torch.float32):
    """Selective scan with VMamba's shapes (spec §5.1); float32 state, float32 output by default.

    u, delta: (batch, K*D, L); A: (K*D, N); B, C: (batch, K, N, L), each group shared by D channels;
    D, delta_bias: (K*D,). Differentiable with respect to every tensor input.
    """
    impl = _lookup("selective_scan", backend, u.device)
    y = impl(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype=output_dtype)
    return mark_selective_scan(y, A.shape[1])


def cross_scan(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W) in the four scan orders."""
    return _lookup("cross_scan", backend, x.device)(x)


def cross_merge(ys: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(B, 4, D, H, W) -> (B, D, H, W): the sum of the four directions read back at each pixel."""
    return _lookup("cross_merge", backend, ys.device)(ys)


def compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 backend="auto"):
    """The SS2D core from separate ops (what a fused kernel must reproduce).

    x: (B, Di, H, W) after the depthwise conv and SiLU. Returns (B, Di, H, W) in float32.
    """
    b, d_inner, height, width = x.shape
    length = height * width
    d_state = A_logs.shape[1]
    rank = dt_projs_weight.shape[2]
    xs = cross_scan(x, backend)                                           # (B, K, Di, L)
    # Broadcast matmuls run as one batched GEMM over (B*K) on the sequences as they lie; einsum
    # would permute (B, K, Di, L) to put K first and copy it.
    x_dbl = torch.matmul(x_proj_weight.to(xs.dtype), xs)                  # (B, K, R+2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    dts = torch.matmul(dt_projs_weight.to(dts.dtype), dts)                # (B, K, Di, L)
    ys = selective_scan(
        xs.reshape(b, -1, length), dts.reshape(b, -1, length), -torch.exp(A_logs.float()),
        Bs.contiguous(), Cs.contiguous(), Ds.float(), dt_projs_bias.reshape(-1).float(),
        delta_softplus=True, backend=backend,
    )
    return cross_merge(ys.view(b, NUM_DIRECTIONS, d_inner, height, width), backend)


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend="auto"):
    """SS2D core: cross-scan, x/dt projections, selective scan with softplus, cross-merge."""
    fused = _op(resolve_backend(backend, x.device), "cross_selective_scan")
    # Under a dispatch mode (FlopCounterMode, fake tensors) the separate ops run instead, so that
    # counters see the projections and the marked scan; the result is the same.
    if fused is not None and not in_dispatch_mode():
        return fused(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    return compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend)
