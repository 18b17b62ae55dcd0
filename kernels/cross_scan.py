"""Cross-scan and cross-merge: the four scan orders of SS2D (spec §3.7).

For a map x of shape (B, D, H, W) and pixel (h, w), the sequence position in direction k is::

    k=0  row-major               h*W + w
    k=1  column-major            w*H + h
    k=2  row-major reversed      L-1 - (h*W + w)
    k=3  column-major reversed   L-1 - (w*H + h)

``cross_scan`` lays x out along each order -> (B, 4, D, L). ``cross_merge`` is its adjoint: it
reads every direction back at each pixel and sums, (B, 4, D, H, W) -> (B, D, H, W). Since both are a
permutation (and a sum), the gradient of one is the other.

``*_reference`` versions gather with explicit index tables built from the formulas above and are
the test oracle; the plain versions use flips and transposes.
"""

from __future__ import annotations

import functools

import torch

NUM_DIRECTIONS = 4


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


def cross_scan_torch(x: torch.Tensor) -> torch.Tensor:
    b, d, height, width = x.shape
    rows = x.reshape(b, d, height * width)
    cols = x.transpose(2, 3).reshape(b, d, height * width)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge_torch(ys: torch.Tensor) -> torch.Tensor:
    b, k, d, height, width = ys.shape
    seq = ys.reshape(b, k, d, height * width)
    rows = seq[:, 0] + seq[:, 2].flip(-1)
    cols = seq[:, 1] + seq[:, 3].flip(-1)
    return rows.view(b, d, height, width) + cols.view(b, d, width, height).transpose(2, 3)
