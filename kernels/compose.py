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

__all__ = ["compose_ops"]


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
