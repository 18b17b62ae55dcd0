"""The selective scan and the SS2D core as PyTorch operators (``torch.library`` custom ops).

    vmamba::selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D,
        Tensor? delta_bias, bool delta_softplus, ScalarType output_dtype, str backend,
        bool save_states) -> (Tensor y, Tensor states)
    vmamba::selective_scan_backward(Tensor grad_y, Tensor u, Tensor delta, Tensor A, Tensor B,
        Tensor C, Tensor? D, Tensor? delta_bias, Tensor states, bool delta_softplus, str backend)
        -> Tensor[]                               (du, ddelta, dA, dB, dC, dD, ddelta_bias)
    vmamba::cross_selective_scan(Tensor x, Tensor x_proj_weight, Tensor dt_projs_weight,
        Tensor dt_projs_bias, Tensor A_logs, Tensor Ds, str backend, bool save_states)
        -> (Tensor y, Tensor proj, Tensor states)
    vmamba::cross_selective_scan_backward(Tensor grad_y, Tensor x, Tensor x_proj_weight,
        Tensor dt_projs_weight, Tensor dt_projs_bias, Tensor A_logs, Tensor Ds, Tensor proj,
        Tensor states, str backend) -> Tensor[]  (one gradient per input)

A tracer (torch.compile, torch.export, FlopCounterMode, fake tensors) sees each call as one node:
the fake implementations give shapes and dtypes, ``register_autograd`` makes the forward call the
backward op (so a compiled backward holds the kernel too), and the FLOP formulas give counters the
official count (docs/design.md §6; 2 per multiply-add, the backward twice the forward).

``backend`` is the name the caller chose ("auto" included); it is resolved for the tensors' device
when the op runs (``registry.resolve_backend``): "cpu" runs the native kernel, "triton" the Triton
kernels (CUDA), anything else the PyTorch "torch" path; a backend without a fused SS2D core runs
the composed ops inside the core op. ``save_states`` says whether a backward will follow: the
native kernel then also returns its residuals (the x projection and the chunk-end states), which
its backward reads instead of recomputing; every other backend returns empty residuals and its
backward recomputes what it needs from the inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import cpu as _cpu
from .common import NUM_DIRECTIONS
from .compose import compose_backward, compose_ops
from .flops import scan_flops
from .registry import _triton, lookup, resolve_backend
from .torch_scan import blocked_scan_backward, cross_merge_torch, cross_scan_torch

__all__ = ["scan_op", "core_op"]


def _none(like: Tensor) -> Tensor:
    """The empty residual of a backend that keeps none."""
    return like.new_empty(0, dtype=torch.float32)


def _core_layout(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised (B, D, H, W) tensor with channels-last strides: the layout of the core's
    output (and of the gradient of x), whatever backend computed it."""
    b, d, height, width = x.shape
    return x.new_empty((b, height, width, d), dtype=dtype).permute(0, 3, 1, 2)


def _in_core_layout(t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    return _core_layout(x, dtype).copy_(t)


def _grad_out(grad: Tensor | None, like: Tensor) -> Tensor:
    """A gradient as the backward ops return it: contiguous, or an empty tensor for an absent input."""
    return _none(like) if grad is None else grad.contiguous()


def _like(t: Tensor | None, like: Tensor) -> Tensor:
    return _none(like) if t is None else like.new_empty(t.shape, dtype=t.dtype)


# --------------------------------------------------------------------------------------------
# Selective scan
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("vmamba::selective_scan", mutates_args=())
def scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            delta_bias: Optional[Tensor], delta_softplus: bool, output_dtype: torch.dtype, backend: str,
            save_states: bool) -> tuple[Tensor, Tensor]:
    name = resolve_backend(backend, u.device)
    if u.numel() == 0:
        return u.new_zeros(u.shape, dtype=output_dtype), _none(u)
    if name == "cpu":
        y, states = _cpu.scan_forward_native(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype,
                                             save_states)
        return y, _none(u) if states is None else states
    impl = lookup("selective_scan", name, u.device)
    with torch.no_grad():
        y = impl(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype=output_dtype)
    return y.contiguous(), _none(u)


@scan_op.register_fake
def _scan_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, backend, save_states):
    y = u.new_empty(u.shape, dtype=output_dtype)
    if save_states and resolve_backend(backend, u.device) == "cpu" and u.numel() != 0:
        return y, u.new_empty(_cpu.scan_states_shape(u, A, B), dtype=torch.float32)
    return y, _none(u)


@torch.library.custom_op("vmamba::selective_scan_backward", mutates_args=())
def scan_backward_op(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                     D: Optional[Tensor], delta_bias: Optional[Tensor], states: Tensor, delta_softplus: bool,
                     backend: str) -> list[Tensor]:
    inputs = (u, delta, A, B, C, D, delta_bias)
    name = resolve_backend(backend, u.device)
    if u.numel() == 0:
        grads = [None if t is None else torch.zeros_like(t) for t in inputs]
    elif name == "cpu" and states.numel():
        grads = _cpu.scan_backward_native(u, delta, A, B, C, D, delta_bias, delta_softplus, states, grad_y)
    elif name == "triton":
        grads = _triton.scan_grads(u, delta, A, B, C, D, delta_bias, delta_softplus, grad_y)
    else:
        grads = blocked_scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, grad_y)
    return [_grad_out(g, u) for g in grads]


@scan_backward_op.register_fake
def _scan_backward_fake(grad_y, u, delta, A, B, C, D, delta_bias, states, delta_softplus, backend):
    return [_like(t, u) for t in (u, delta, A, B, C, D, delta_bias)]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, _, backend, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _scan_backward(ctx, grad_y, _grad_states):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    du, d_delta, dA, dB, dC, dD, d_bias = torch.ops.vmamba.selective_scan_backward(
        grad_y, u, delta, A, B, C, D, delta_bias, states, ctx.delta_softplus, ctx.backend)
    return (du, d_delta, dA, dB, dC, None if D is None else dD, None if delta_bias is None else d_bias,
            None, None, None, None)


scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# --------------------------------------------------------------------------------------------
# SS2D core
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("vmamba::cross_selective_scan", mutates_args=())
def core_op(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor, A_logs: Tensor,
            Ds: Tensor, backend: str, save_states: bool) -> tuple[Tensor, Tensor, Tensor]:
    params = (x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    name = resolve_backend(backend, x.device)
    if x.numel() == 0:
        return _core_layout(x, torch.float32).zero_(), _none(x), _none(x)
    if name == "cpu":
        y, proj, states = _cpu.core_forward_native(x, *params, save_states)
        return y, _none(x) if proj is None else proj, _none(x) if states is None else states
    fused = lookup("cross_selective_scan", name, x.device, fallback=False)
    with torch.no_grad():
        if fused is not None:
            y = fused(x, *params)
        else:
            y = compose_ops(x, *params, scan=lookup("selective_scan", name, x.device),
                            cross_scan=lookup("cross_scan", name, x.device),
                            cross_merge=lookup("cross_merge", name, x.device))
    return _in_core_layout(y, x, torch.float32), _none(x), _none(x)


@core_op.register_fake
def _core_fake(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend, save_states):
    y = _core_layout(x, torch.float32)
    if save_states and resolve_backend(backend, x.device) == "cpu" and x.numel() != 0:
        proj_shape, states_shape = _cpu.core_residual_shapes(x, x_proj_weight, A_logs)
        return y, x.new_empty(proj_shape, dtype=torch.float32), x.new_empty(states_shape, dtype=torch.float32)
    return y, _none(x), _none(x)


@torch.library.custom_op("vmamba::cross_selective_scan_backward", mutates_args=())
def core_backward_op(grad_y: Tensor, x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor,
                     dt_projs_bias: Tensor, A_logs: Tensor, Ds: Tensor, proj: Tensor, states: Tensor,
                     backend: str) -> list[Tensor]:
    inputs = (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    name = resolve_backend(backend, x.device)
    if x.numel() == 0:
        grads = [torch.zeros_like(t) for t in inputs]
    elif name == "cpu" and states.numel():
        grads = _cpu.core_backward_native(*inputs, proj, states, grad_y)
    else:
        scan_backward = _triton.scan_grads if name == "triton" else blocked_scan_backward
        grads = compose_backward(*inputs, grad_y, scan_backward=scan_backward, cross_scan=cross_scan_torch,
                                 cross_merge=cross_merge_torch)
    dx, *rest = grads
    return [_in_core_layout(dx, x, x.dtype), *(g.contiguous() for g in rest)]


@core_backward_op.register_fake
def _core_backward_fake(grad_y, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, proj, states,
                        backend):
    return [_core_layout(x, x.dtype), *(_like(t, x) for t in (x_proj_weight, dt_projs_weight, dt_projs_bias,
                                                               A_logs, Ds))]


def _core_setup_context(ctx, inputs, output):
    *tensors, backend, _ = inputs
    ctx.save_for_backward(*tensors, output[1], output[2])
    ctx.backend = backend


def _core_backward(ctx, grad_y, _grad_proj, _grad_states):
    grads = torch.ops.vmamba.cross_selective_scan_backward(grad_y, *ctx.saved_tensors, ctx.backend)
    return (*grads, None, None)


core_op.register_autograd(_core_backward, setup_context=_core_setup_context)


# --------------------------------------------------------------------------------------------
# FLOP formulas (FlopCounterMode counts 2 per multiply-add)
# --------------------------------------------------------------------------------------------

def _scan_macs(u_shape, A_shape) -> int:
    batch, channels, length = u_shape
    return scan_flops(batch, channels, length, A_shape[1])


def _core_macs(x_shape, x_proj_shape, dt_projs_shape, A_logs_shape) -> int:
    """x/dt projections (the two batched GEMMs of the composed core) plus the scan."""
    batch, d_inner, height, width = x_shape
    length = height * width
    k, rank = NUM_DIRECTIONS, dt_projs_shape[2]
    projections = batch * k * x_proj_shape[1] * d_inner * length + batch * k * d_inner * rank * length
    return projections + scan_flops(batch, k * d_inner, length, A_logs_shape[1])


@register_flop_formula(torch.ops.vmamba.selective_scan)
def _scan_flop_formula(u_shape, delta_shape, A_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _scan_macs(u_shape, A_shape)


@register_flop_formula(torch.ops.vmamba.selective_scan_backward)
def _scan_backward_flop_formula(grad_shape, u_shape, delta_shape, A_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _scan_macs(u_shape, A_shape)


@register_flop_formula(torch.ops.vmamba.cross_selective_scan)
def _core_flop_formula(x_shape, x_proj_shape, dt_projs_shape, bias_shape, A_logs_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return 2 * _core_macs(x_shape, x_proj_shape, dt_projs_shape, A_logs_shape)


@register_flop_formula(torch.ops.vmamba.cross_selective_scan_backward)
def _core_backward_flop_formula(grad_shape, x_shape, x_proj_shape, dt_projs_shape, bias_shape, A_logs_shape,
                                *args, out_shape=None, **kwargs) -> int:
    return 4 * _core_macs(x_shape, x_proj_shape, dt_projs_shape, A_logs_shape)
