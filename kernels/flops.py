"""The selective scan's FLOP count, and the mark that makes a scan visible to FLOP counters.

``scan_flops`` is the one formula: the official convention (fvcore; docs/design.md §6) counts a
selective scan as ``9*B*L*D*N + B*D*L`` (D = channels of u, i.e. K*d_inner; mamba issue #110), one
multiply-add = 1 FLOP. The application's analytic count (``vmamba_cli.flops``) uses it per block.

``torch.utils.flop_counter.FlopCounterMode`` only counts ATen ops that have a formula, so a scan
written from element-wise ops (or a native kernel) is invisible to it. ``mark_selective_scan``
routes the scan output through a tiny custom op, ``vmamba::selective_scan_flops``, carrying that
count (x2: FlopCounterMode counts 2 FLOPs per multiply-add) whenever a dispatch mode such as
FlopCounterMode is active; outside such a mode it returns its input untouched, so normal
forward/backward pays nothing. Its backward is a marker too (2x the forward count, the usual
convention for a linear op's two gradient products) and passes the gradient through unchanged.
While a dispatch mode is active, ``kernels.cross_selective_scan`` also skips fused SS2D kernels and
runs the separate ops, so the x/dt projections are counted as the matmuls they are.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

__all__ = ["scan_flops", "mark_selective_scan", "in_dispatch_mode"]


def scan_flops(batch: int, channels: int, length: int, d_state: int, with_d: bool = True) -> int:
    """Official selective-scan count: 9*B*L*D*N (+ B*D*L for the D skip term)."""
    return 9 * batch * length * channels * d_state + (batch * channels * length if with_d else 0)


# Each marker is an out-of-place identity (custom ops may not alias their input) whose only job is
# to carry a FLOP formula; it is called only while a TorchDispatchMode is active.

@torch.library.custom_op("vmamba::selective_scan_flops", mutates_args=())
def _scan_marker(y: torch.Tensor, d_state: int) -> torch.Tensor:
    return y.clone()


@torch.library.custom_op("vmamba::selective_scan_backward_flops", mutates_args=())
def _scan_backward_marker(grad: torch.Tensor, d_state: int) -> torch.Tensor:
    return grad.clone()


for _marker in (_scan_marker, _scan_backward_marker):
    _marker.register_fake(lambda t, *args: torch.empty_like(t))


def _scan_marker_backward(ctx, grad):
    return torch.ops.vmamba.selective_scan_backward_flops(grad, ctx.d_state), None


def _save_d_state(ctx, inputs, output):
    ctx.d_state = inputs[1]


_scan_marker.register_autograd(_scan_marker_backward, setup_context=_save_d_state)


def _scan_formula_macs(y_shape, d_state: int) -> int:
    batch, channels, length = y_shape
    return scan_flops(batch, channels, length, d_state)


@register_flop_formula(torch.ops.vmamba.selective_scan_flops)
def _scan_flop_formula(y_shape, d_state, *args, out_shape=None, **kwargs) -> int:
    return 2 * _scan_formula_macs(y_shape, d_state)


@register_flop_formula(torch.ops.vmamba.selective_scan_backward_flops)
def _scan_backward_flop_formula(grad_shape, d_state, *args, out_shape=None, **kwargs) -> int:
    return 4 * _scan_formula_macs(grad_shape, d_state)


def in_dispatch_mode() -> bool:
    """True while a TorchDispatchMode (FlopCounterMode, FakeTensorMode, ...) is active."""
    return is_in_torch_dispatch_mode()


def mark_selective_scan(y: torch.Tensor, d_state: int) -> torch.Tensor:
    """Let FLOP counters see a selective scan whose output is ``y`` (B, K*D, L); identity otherwise."""
    if not is_in_torch_dispatch_mode():
        return y
    return torch.ops.vmamba.selective_scan_flops(y, int(d_state))
