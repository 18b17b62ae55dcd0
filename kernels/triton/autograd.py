"""The Triton selective scan as a differentiable PyTorch op (backend "triton").

The scan follows docs/design.md §5.2 with VMamba's shapes::

    u, delta   (batch, K*D, L)   float32 / float16 / bfloat16
    A          (K*D, N)          float32
    B, C       (batch, K, N, L)  shared by the D channels of group k
    D, delta_bias (K*D,)         float32, optional

The forward keeps the state entering each tile only when a backward can follow.
"""

from __future__ import annotations

import torch

from ..common import check_scan_shapes, empty_scan
from .common import triton
from .launch import scan_backward, scan_forward
from .tuning import TritonTuning, choose_scan_config

__all__ = ["selective_scan"]


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg):
        # Tile-entry states are kept only when a backward can follow.
        store_states = any(ctx.needs_input_grad[:7])
        y, tile_state = scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg,
                                      store_states)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, tile_state)
        ctx.delta_softplus = delta_softplus
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, tile_state = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = scan_backward(
            u, delta, A, B, C, D, delta_bias, tile_state, dy.contiguous(), ctx.delta_softplus, ctx.cfg)
        # A, D, delta_bias are float32 here; autograd carries their gradients back through .float().
        return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias, None, None, None)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                   output_dtype=torch.float32, chunk_size=None, block_d=None, block_t=None, num_warps=None,
                   tuning: TritonTuning | None = None):
    """Selective scan (docs/design.md §5.2) with a Triton forward and backward; float32 state.

    ``chunk_size`` / ``block_d`` / ``block_t`` / ``num_warps`` override the launch heuristic (tests
    use a small ``chunk_size`` to exercise the cross-chunk carry; the GPU benchmark sweeps the rest);
    ``tuning`` replaces the launch tables. ``block_t`` must be a power of two.
    """
    if triton is None:
        raise RuntimeError("the triton scan backend needs the triton package")
    groups = check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return empty_scan(u, delta, A, B, C, D, delta_bias, output_dtype)
    batch, channels, length = u.shape
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    cfg = choose_scan_config(batch, groups, channels // groups, A.shape[1], length, u.device,
                             chunk_size, block_d, block_t, num_warps=num_warps, training=training, tuning=tuning)
    # A, D and delta_bias are float32 in VMamba; the kernels read them as float32.
    A_f = A.float().contiguous()
    D_f = None if D is None else D.float().contiguous()
    bias_f = None if delta_bias is None else delta_bias.float().contiguous()
    y = _TritonSelectiveScan.apply(
        u.contiguous(), delta.contiguous(), A_f, B.contiguous(), C.contiguous(), D_f, bias_f,
        bool(delta_softplus), output_dtype, cfg)
    return y
