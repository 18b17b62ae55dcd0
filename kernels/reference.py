"""Reference forms (the test oracle): the sequential selective scan and index-table cross-scan / merge.

Selective scan, per batch b, channel c (direction group k = c // (KD / G)) and state n
(docs/design.md §5.2)::

    dt_t   = softplus(delta[b, c, t] + delta_bias[c])          (softplus optional)
    h_t    = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B[b, k, n, t] * u[b, c, t],   h_{-1} = 0
    y_t    = sum_n C[b, k, n, t] * h_t + D[c] * u[b, c, t]

``selective_scan_reference`` takes one step at a time under autograd, float32 throughout: slow,
obviously correct.

Cross-scan and cross-merge, the four scan orders of SS2D (docs/design.md §3.7). For a map x of
shape (B, D, H, W) and pixel (h, w), the sequence position in direction k is::

    k=0  row-major               h*W + w
    k=1  column-major            w*H + h
    k=2  row-major reversed      L-1 - (h*W + w)
    k=3  column-major reversed   L-1 - (w*H + h)

``cross_scan`` lays x out along each order -> (B, 4, D, L). ``cross_merge`` is its adjoint: it
reads every direction back at each pixel and sums, (B, 4, D, H, W) -> (B, D, H, W). Since both are a
permutation (and a sum), the gradient of one is the other. The references gather with explicit
index tables built from the formulas above.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .common import NUM_DIRECTIONS, check_scan_shapes, empty_scan

__all__ = ["selective_scan_reference", "cross_scan_reference", "cross_merge_reference", "per_channel",
           "step_size"]


def per_channel(m: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G, N, L) group matrix -> (B, channels, N, L), each group repeated for its channels."""
    b, g, n, l = m.shape
    return m[:, :, None].expand(b, g, channels // g, n, l).reshape(b, channels, n, l)


def step_size(delta, delta_bias, delta_softplus):
    """dt in float32: delta (+ delta_bias), through softplus if asked."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                             output_dtype=torch.float32):
    """Step-by-step selective scan; differentiable through autograd. Slow: use it as the oracle."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return empty_scan(u, delta, A, B, C, D, delta_bias, output_dtype)
    channels, length = u.shape[1], u.shape[2]
    uf = u.float()
    dt = step_size(delta, delta_bias, delta_softplus)
    Bc = per_channel(B.float(), channels)
    Cc = per_channel(C.float(), channels)
    Af = A.float()
    h = uf.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * uf
    return y.to(output_dtype)


@functools.lru_cache(maxsize=64)
def _routes(height: int, width: int) -> torch.Tensor:
    """(4, L) table: routes[k, p] = sequence position of flat pixel p = h*W + w in direction k."""
    h = torch.arange(height)[:, None].expand(height, width).reshape(-1)
    w = torch.arange(width)[None, :].expand(height, width).reshape(-1)
    length = height * width
    row, col = h * width + w, w * height + h
    return torch.stack([row, col, length - 1 - row, length - 1 - col])


def cross_scan_reference(x: torch.Tensor) -> torch.Tensor:
    b, d, height, width = x.shape
    routes = _routes(height, width).to(x.device)
    # The sequence of direction k visits pixel p at routes[k, p]; invert to gather.
    pixel_at = torch.argsort(routes, dim=1)
    flat = x.reshape(b, d, height * width)
    return torch.stack([flat[:, :, pixel_at[k]] for k in range(NUM_DIRECTIONS)], dim=1)


def cross_merge_reference(ys: torch.Tensor) -> torch.Tensor:
    b, k, d, height, width = ys.shape
    routes = _routes(height, width).to(ys.device)
    seq = ys.reshape(b, k, d, height * width)
    merged = sum(seq[:, i][:, :, routes[i]] for i in range(NUM_DIRECTIONS))
    return merged.reshape(b, d, height, width)
