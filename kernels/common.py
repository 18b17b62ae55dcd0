"""What every backend shares: the number of scan directions, shape checks, empty inputs.

Shapes (docs/design.md §5.1)::

    u, delta          (batch, K*D, L)
    A                 (K*D, N)
    B, C              (batch, K, N, L)   group k shared by D channels
    D, delta_bias     (K*D,)             optional

and for the SS2D core, x (batch, D, H, W) with the parameters of ``check_core_shapes``.
"""

from __future__ import annotations

import torch

__all__ = ["NUM_DIRECTIONS", "check_scan_shapes", "check_core_shapes", "empty_scan", "is_empty_core"]

# The four scan routes of SS2D (docs/design.md §3.7): row-major, column-major and their mirrors.
NUM_DIRECTIONS = 4


def check_scan_shapes(u, delta, A, B, C, D=None, delta_bias=None) -> int:
    """Validate the official selective-scan shapes; return the number of groups G."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (channels={channels}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.dim() != 4 or m.shape[0] != batch or m.shape[2] != d_state or m.shape[3] != length:
            raise ValueError(
                f"{name} must be (batch={batch}, groups, d_state={d_state}, length={length}), "
                f"got {tuple(m.shape)}"
            )
    groups = B.shape[1]
    if C.shape[1] != groups or groups == 0 or channels % groups:
        raise ValueError(f"B and C need the same group count dividing {channels}, got {B.shape[1]}, {C.shape[1]}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (channels,):
            raise ValueError(f"{name} must be ({channels},), got {tuple(v.shape)}")
    return groups


def check_core_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds) -> None:
    """Validate the SS2D core's shapes: x (B, D, H, W) and the four routes' parameters."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, d_inner, H, W), got {tuple(x.shape)}")
    d = x.shape[1]
    k, rank = NUM_DIRECTIONS, dt_projs_weight.shape[-1]
    n = A_logs.shape[-1]
    expected = {"x_proj_weight": (k, rank + 2 * n, d), "dt_projs_weight": (k, d, rank),
                "dt_projs_bias": (k, d), "A_logs": (k * d, n), "Ds": (k * d,)}
    for name, t in zip(expected, (x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")


def empty_scan(u, delta, A, B, C, D=None, delta_bias=None, output_dtype=torch.float32) -> torch.Tensor:
    """The scan of an empty input (batch 0, L = 0 or no channels): an empty output.

    It is still a function of every input, so a backward gives each one its (empty or zero)
    gradient of the right shape, however often it is called.
    """
    y = u.new_zeros(u.shape, dtype=torch.float32)
    anchor = sum(t.float().sum() for t in (u, delta, A, B, C, D, delta_bias) if t is not None)
    return (y + 0.0 * anchor).to(output_dtype)


def is_empty_core(x: torch.Tensor) -> bool:
    """True when the SS2D core has nothing to scan (batch 0, no channels, or H*W = 0)."""
    return x.numel() == 0
