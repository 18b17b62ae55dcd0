"""Triton cross-scan / cross-merge (docs/design.md §3.7): one permutation kernel for both directions.

A program takes one batch element, a few channels and a square tile of pixels and addresses the
map through its strides, so channels-last activations are read and written in place. The backward
of the scan is the merge and vice versa.
"""

from __future__ import annotations

import torch

from .common import cdiv, next_power_of_2, tl, triton
from .tuning import DEFAULT_TUNING, TritonTuning

__all__ = ["cross_scan", "cross_merge", "scan_layout", "merge_layout"]

if triton is not None:

    @triton.jit
    def _cross_kernel(x_ptr, seq_ptr, n_channels, height, width, stride_b, stride_c, stride_h, stride_w,
                      MERGE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        """One program = one batch element, BLOCK_C channels, one BLOCK_H x BLOCK_W tile of pixels.

        Pixel (h, w) sits at sequence position h*W+w (k=0), w*H+h (k=1) and their mirrors L-1-...
        (k=2, 3). The map is addressed through its strides, so NCHW and channels-last tensors are read
        (MERGE=False: scatter x to the four sequences) or written (MERGE=True: gather and sum them) in
        place; the compiler moves the tile between the map's and the sequences' fast axes.
        """
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        channel_blocks = tl.cdiv(n_channels, BLOCK_C)
        batch = (pid // channel_blocks).to(tl.int64)
        offs_c = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        tiles_w = tl.cdiv(width, BLOCK_W)
        offs_h = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_w = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        c3 = offs_c[:, None, None]
        h3 = offs_h[None, :, None]
        w3 = offs_w[None, None, :]
        mask = (c3 < n_channels) & (h3 < height) & (w3 < width)
        length = height * width
        row_major = h3 * width + w3
        col_major = w3 * height + h3
        # seq is (B, 4, C, L): direction k of (batch, channel) starts at ((batch*4 + k)*C + channel)*L.
        plane = (batch * 4 * n_channels + c3) * length
        step = n_channels * length
        x_tile = x_ptr + batch * stride_b + c3 * stride_c + h3 * stride_h + w3 * stride_w
        if MERGE:
            total = tl.load(seq_ptr + plane + row_major, mask=mask, other=0.0).to(tl.float32)
            total += tl.load(seq_ptr + plane + step + col_major, mask=mask, other=0.0).to(tl.float32)
            total += tl.load(seq_ptr + plane + 2 * step + (length - 1 - row_major), mask=mask, other=0.0).to(tl.float32)
            total += tl.load(seq_ptr + plane + 3 * step + (length - 1 - col_major), mask=mask, other=0.0).to(tl.float32)
            tl.store(x_tile, total, mask=mask)
        else:
            value = tl.load(x_tile, mask=mask, other=0.0)
            tl.store(seq_ptr + plane + row_major, value, mask=mask)
            tl.store(seq_ptr + plane + step + col_major, value, mask=mask)
            # The mirrored routes written in ascending order (2.2x faster than descending stores):
            # pixel (H-1-h, W-1-w) sits at position h*W+w of route 2 and w*H+h of route 3, so
            # read x there instead.
            mirrored = tl.load(x_ptr + batch * stride_b + c3 * stride_c + (height - 1 - h3) * stride_h
                               + (width - 1 - w3) * stride_w, mask=mask, other=0.0)
            tl.store(seq_ptr + plane + 2 * step + row_major, mirrored, mask=mask)
            tl.store(seq_ptr + plane + 3 * step + col_major, mirrored, mask=mask)


def _cross_launch(x, seq, merge, launch: tuple[int, int, int]):
    """Launch the cross kernel between the map x and the sequences seq with (BLOCK_C, BLOCK_HW, warps)."""
    if x.numel() == 0:
        return
    batch, channels, height, width = x.shape
    block_c, block_hw, num_warps = launch
    block_c = min(block_c, next_power_of_2(channels))
    block_h = min(block_hw, next_power_of_2(height))
    block_w = min(block_hw, next_power_of_2(width))
    grid = (batch * cdiv(channels, block_c), cdiv(height, block_h) * cdiv(width, block_w))
    _cross_kernel[grid](x, seq, channels, height, width, *x.stride(),
                        MERGE=merge, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps)


def scan_layout(x, tuning: TritonTuning | None = None):
    """(B, D, H, W) (any strides) -> (B, 4, D, L) sequences."""
    b, d, h, w = x.shape
    seq = torch.empty(b, 4, d, h * w, dtype=x.dtype, device=x.device)
    _cross_launch(x, seq, False, (tuning or DEFAULT_TUNING).cross_scan_launch)
    return seq


def merge_layout(seq, height, width, tuning: TritonTuning | None = None):
    """(B, 4, D, L) -> (B, D, H, W) with channels-last strides (what a channel LayerNorm reads best)."""
    b, _, d, _ = seq.shape
    out = torch.empty(b, d, height, width, dtype=seq.dtype, device=seq.device, memory_format=torch.channels_last)
    _cross_launch(out, seq.contiguous(), True, (tuning or DEFAULT_TUNING).cross_merge_launch)
    return out


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tuning):
        ctx.hw, ctx.tuning = x.shape[2:], tuning
        return scan_layout(x, tuning)

    @staticmethod
    def backward(ctx, grad):
        return merge_layout(grad, *ctx.hw, ctx.tuning), None


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, tuning):
        b, k, d, height, width = ys.shape
        ctx.shape, ctx.tuning = ys.shape, tuning
        return merge_layout(ys.reshape(b, k, d, height * width), height, width, tuning)

    @staticmethod
    def backward(ctx, grad):
        return scan_layout(grad, ctx.tuning).view(ctx.shape), None


def cross_scan(x: torch.Tensor, tuning: TritonTuning | None = None) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W) in the four SS2D scan orders."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, D, H, W), got {tuple(x.shape)}")
    return _CrossScan.apply(x, tuning)


def cross_merge(ys: torch.Tensor, tuning: TritonTuning | None = None) -> torch.Tensor:
    """(B, 4, D, H, W) -> (B, D, H, W): the four directions read back at each pixel and summed."""
    if ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, D, H, W), got {tuple(ys.shape)}")
    return _CrossMerge.apply(ys, tuning)
