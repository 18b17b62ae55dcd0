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
    registry.py    the backends, "auto" and availability per device
    ops.py         the registered operators vmamba::selective_scan, vmamba::cross_selective_scan
                   (and their backward ops): what torch.compile / torch.export see

``selective_scan`` and ``cross_selective_scan`` call the registered operators, which run the
chosen backend; a backend marked inline in the registry ("reference") runs as plain PyTorch code
instead, and so does any call given a ``tuning`` (a ``triton.TritonTuning``, which reaches the
Triton backend only; the others ignore it). ``cross_scan`` / ``cross_merge`` are plain functions.
"""

from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (registers the vmamba:: operators)
from .common import NUM_DIRECTIONS, check_core_shapes, check_scan_shapes
from .compose import compose_ops
from .flops import mark_selective_scan
from .registry import BACKENDS, _triton, available_backends, has_op, is_inline, lookup, own_op, resolve_backend

__all__ = [
    "selective_scan", "cross_scan", "cross_merge", "cross_selective_scan", "compose_cross_selective_scan",
    "available_backends", "resolve_backend", "has_op", "row_layer_norm", "BACKENDS", "NUM_DIRECTIONS",
]


def _op(backend: str, op: str):
    """The backend's own ``op`` or None (prefer ``has_op``)."""
    return own_op(backend, op)


def _needs_grad(*tensors) -> bool:
    """Whether a backward can follow, so the native kernel should keep its residuals. Not while
    torch.export traces: an exported program is for inference, and residual sizes would add guards
    on the symbolic sizes (a backward through one recomputes what it needs instead)."""
    if torch.compiler.is_exporting():
        return False
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto",
                   output_dtype=torch.float32, tuning=None):
    """Selective scan with VMamba's shapes (docs/design.md §5.1); float32 state, float32 output by default.

    u, delta: (batch, K*D, L); A: (K*D, N); B, C: (batch, K, N, L), each group shared by D channels;
    D, delta_bias: (K*D,). Differentiable with respect to every tensor input.
    """
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if tuning is not None or is_inline(backend):
        impl = lookup("selective_scan", backend, u.device, tuning)
        y = impl(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype=output_dtype)
        return mark_selective_scan(y, A.shape[1])
    save = _needs_grad(u, delta, A, B, C, D, delta_bias)
    return torch.ops.vmamba.selective_scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), output_dtype,
                                           backend, save)[0]


def cross_scan(x: torch.Tensor, backend: str = "auto", tuning=None) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W) in the four scan orders."""
    return lookup("cross_scan", backend, x.device, tuning)(x)


def cross_merge(ys: torch.Tensor, backend: str = "auto", tuning=None) -> torch.Tensor:
    """(B, 4, D, H, W) -> (B, D, H, W): the sum of the four directions read back at each pixel."""
    return lookup("cross_merge", backend, ys.device, tuning)(ys)


def compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 backend="auto", tuning=None):
    """The SS2D core from separate ops (what a fused kernel must reproduce).

    x: (B, Di, H, W) after the depthwise conv and SiLU. Returns (B, Di, H, W) in float32.
    """
    device = x.device
    return compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                       scan=lookup("selective_scan", backend, device, tuning),
                       cross_scan=lookup("cross_scan", backend, device, tuning),
                       cross_merge=lookup("cross_merge", backend, device, tuning))


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend="auto",
                         tuning=None):
    """SS2D core: cross-scan, x/dt projections, selective scan with softplus, cross-merge.

    (B, Di, H, W) -> (B, Di, H, W) float32 with channels-last strides.
    """
    params = (x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    check_core_shapes(x, *params)
    if tuning is not None or is_inline(backend):
        fused = lookup("cross_selective_scan", backend, x.device, tuning, fallback=False)
        if fused is not None:
            return fused(x, *params)
        return compose_cross_selective_scan(x, *params, backend=backend, tuning=tuning)
    save = _needs_grad(x, *params)
    return torch.ops.vmamba.cross_selective_scan(x, *params, backend, save)[0]


def row_layer_norm(device):
    """The Triton LayerNorm over contiguous rows (``triton.layernorm.layer_norm_rows``) where it runs
    for tensors on ``device``, else None."""
    if _triton is None or not _triton.layernorm.is_available(device):
        return None
    return _triton.layernorm.layer_norm_rows
