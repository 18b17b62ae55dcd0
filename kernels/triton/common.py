"""What the Triton kernels share: the triton import (which may be missing), the interpreter
switch, host-side integer helpers, and the @triton.jit helpers every scan kernel calls.

Works under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests run); that path is for testing only.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["triton", "tl", "INTERPRET", "is_available", "cdiv", "next_power_of_2", "sm_count", "register_cap"]

# Interpreter mode is fixed when triton is imported (docs/design.md §12.1); only then can CPU tensors run.
INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device) -> bool:
    """True for CUDA tensors when triton imports; for CPU tensors only under TRITONINTERPRET=1.

    The ``auto`` order for CPU tensors prefers other backends, so the interpreter is used on CPU only
    when ``backend="triton"`` is asked for explicitly (the tests do).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRET



def cdiv(a: int, b: int) -> int:
    # Plain integers: Triton's cdiv is a @triton.jit function, and calling one from Python costs
    # about 20 us of host time (grids are computed several times per block and step).
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def register_cap(maxnreg):
    """Launch option capping registers per thread (None: the compiler's choice; ignored by the interpreter)."""
    return {} if maxnreg is None or INTERPRET else {"maxnreg": maxnreg}


if triton is not None:

    @triton.jit
    def _compose(decay_left, drive_left, decay_right, drive_right):
        # Steps are affine maps h -> decay * h + drive; this applies the left one, then the right one.
        return decay_left * decay_right, drive_left * decay_right + drive_right

    @triton.jit
    def _route_offsets(t, route, height, width, stride_h, stride_w):
        """Offsets in a (B, D, H, W) map (element strides) of the pixels at sequence positions t of
        scan route 0-3 (docs/design.md §3.7): h*W+w, w*H+h and their mirrors L-1-(...)."""
        position = tl.where(route >= 2, height * width - 1 - t, t)
        column_major = (route % 2) == 1
        major = tl.where(column_major, height, width)
        outer = position // major
        inner = position - outer * major
        h = tl.where(column_major, inner, outer)
        w = tl.where(column_major, outer, inner)
        return h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w

    @triton.jit
    def _io_offsets(row, t, batch, group, offs_d, map_h, map_w, s_b, s_c, s_h, s_w, MAP_IO: tl.constexpr):
        """[BLOCK_D, BLOCK_T] offsets of steps t: along the (batch, channel) rows of a (B, K*D, L)
        sequence tensor, or (MAP_IO) at the pixels that route ``group`` visits in a (B, D, H, W) map
        shared by the four routes, so the cross-scan copies are never built."""
        if MAP_IO:
            base = batch.to(tl.int64) * s_b + offs_d.to(tl.int64) * s_c
            offs = base[:, None] + _route_offsets(t, group, map_h, map_w, s_h, s_w)[None, :]
        else:
            offs = row[:, None] + t[None, :]
        return offs

    @triton.jit
    def _program_coords(n_blocks, groups, channels_per_group, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        block = pid % n_blocks
        batch_group = pid // n_blocks
        group = batch_group % groups
        batch = batch_group // groups
        offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < channels_per_group
        channels = group * channels_per_group + offs_d
        return batch, group, channels, mask_d

    @triton.jit
    def _per_channel(ptr, channels, mask_d, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
        """An optional per-channel parameter (D, delta_bias) of the block's channels; zeros if absent."""
        if PRESENT:
            value = tl.load(ptr + channels, mask=mask_d, other=0.0)
        else:
            value = tl.zeros([BLOCK_D], dtype=tl.float32)
        return value

    @triton.jit
    def _step_size(pre, SOFTPLUS: tl.constexpr):
        if SOFTPLUS:
            # torch's softplus (threshold 20); log(1 + exp(-|x|)) never overflows.
            return tl.where(pre > 20.0, pre, tl.maximum(pre, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(pre))))
        return pre

    @triton.jit
    def _steps(u_raw, delta_raw, bias, mask, SOFTPLUS: tl.constexpr):
        """u, pre-activation and dt in float32 from the tiles of u and delta as loaded."""
        u = u_raw.to(tl.float32)
        pre = delta_raw.to(tl.float32) + bias[:, None]
        # Steps past the end get dt = 0: decay 1 and drive 0, so the state passes through unchanged.
        dt = tl.where(mask, _step_size(pre, SOFTPLUS), 0.0)
        return u, pre, dt

