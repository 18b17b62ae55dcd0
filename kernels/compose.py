"""The SS2D core composed from separate ops: what every fused kernel must reproduce.

    x (B, Di, H, W) -> cross-scan -> x projection -> dt projection -> selective scan (softplus)
      -> cross-merge -> (B, Di, H, W) float32                                  (docs/design.md §3.5)

The ops come in as arguments, so each backend composes its own (and falls back to this when its
fused kernel does not apply); the scan's output goes through the FLOP mark.
"""

from __future__ import annotations

import torch

from .common import NUM_DIRECTIONS
from .flops import mark_selective_scan

__all__ = ["compose_ops", "compose_backward"]


def compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, scan, cross_scan, cross_merge):
    """The SS2D core from ``cross_scan`` (B, D, H, W) -> (B, 4, D, L), ``scan`` (the selective scan's
    signature) and ``cross_merge`` (B, 4, D, H, W) -> (B, D, H, W)."""
    b, d_inner, height, width = x.shape
    length = height * width
    d_state = A_logs.shape[1]
    rank = dt_projs_weight.shape[2]
    channels = x_proj_weight.shape[0] * d_inner
    xs = cross_scan(x)                                                    # (B, K, Di, L)
    # Broadcast matmuls run as one batched GEMM over (B*K) on the sequences as they lie; einsum
    # would permute (B, K, Di, L) to put K first and copy it.
    x_dbl = torch.matmul(x_proj_weight.to(xs.dtype), xs)                  # (B, K, R+2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    dts = torch.matmul(dt_projs_weight.to(dts.dtype), dts)                # (B, K, Di, L)
    ys = scan(
        xs.reshape(b, channels, length), dts.reshape(b, channels, length), -torch.exp(A_logs.float()),
        Bs.contiguous(), Cs.contiguous(), Ds.float(), dt_projs_bias.reshape(-1).float(),
        delta_softplus=True,
    )
    ys = mark_selective_scan(ys, d_state)
    return cross_merge(ys.view(b, NUM_DIRECTIONS, d_inner, height, width))


def compose_backward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, grad_y, *, scan_backward,
                     cross_scan, cross_merge):
    """Gradients of the six inputs of ``compose_ops`` for the output gradient ``grad_y``, written out
    (no autograd graph): the projections are recomputed, ``scan_backward`` (the scan's inputs,
    delta_softplus and grad_y -> its seven gradients) differentiates the scan, and cross-merge and
    cross-scan are each other's adjoint."""
    b, d_inner, height, width = x.shape
    length = height * width
    k = NUM_DIRECTIONS
    d_state = A_logs.shape[1]
    rank = dt_projs_weight.shape[2]
    xs = cross_scan(x)                                                    # (B, K, Di, L)
    x_dbl = torch.matmul(x_proj_weight.to(xs.dtype), xs)                  # (B, K, R+2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    delta = torch.matmul(dt_projs_weight.to(dts.dtype), dts)              # (B, K, Di, L)
    A = -torch.exp(A_logs.float())
    grad_seq = cross_scan(grad_y).reshape(b, k * d_inner, length).contiguous()
    du, d_delta, dA, dB, dC, dD, d_bias = scan_backward(
        xs.reshape(b, k * d_inner, length), delta.reshape(b, k * d_inner, length), A, Bs.contiguous(),
        Cs.contiguous(), Ds.float(), dt_projs_bias.reshape(-1).float(), True, grad_seq)
    d_delta = d_delta.view(b, k, d_inner, length)
    d_dts = torch.matmul(dt_projs_weight.transpose(1, 2).to(d_delta.dtype), d_delta)   # (B, K, R, L)
    d_dt_weight = torch.matmul(d_delta, dts.transpose(2, 3).to(d_delta.dtype)).sum(0)  # (K, Di, R)
    d_x_dbl = torch.cat([d_dts, dB.to(d_dts.dtype), dC.to(d_dts.dtype)], dim=2)         # (B, K, R+2N, L)
    d_xs = du.view(b, k, d_inner, length) + torch.matmul(x_proj_weight.transpose(1, 2).to(d_x_dbl.dtype), d_x_dbl)
    d_x_weight = torch.matmul(d_x_dbl, xs.transpose(2, 3).to(d_x_dbl.dtype)).sum(0)     # (K, R+2N, Di)
    dx = cross_merge(d_xs.view(b, k, d_inner, height, width))
    return (dx.to(x.dtype), d_x_weight.to(x_proj_weight.dtype), d_dt_weight.to(dt_projs_weight.dtype),
            d_bias.view(k, d_inner).to(dt_projs_bias.dtype), (dA * A).to(A_logs.dtype), dD.to(Ds.dtype))
