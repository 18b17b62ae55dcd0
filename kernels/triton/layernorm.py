"""LayerNorm over the channels of a channels-last activation, in Triton (forward and backward).

VMamba's channel-first models normalise NCHW maps over C; the model keeps them channels-last in
memory, so each pixel's C values are one contiguous row of a (pixels, C) matrix. PyTorch's
LayerNorm kernel is tuned for long rows and runs at about a third of memory bandwidth on rows of
96-768 values; here each program normalises a block of rows at once.

    y = layer_norm_rows(x, weight, bias, eps)        x: (rows, C), any float dtype -> same dtype

Under CUDA autocast the result is float32, what autocast makes of ``F.layer_norm``; the kernel reads
x in its own dtype and computes in float32 either way, so no cast of x is made. ``out_dtype`` writes
another dtype instead: a LayerNorm whose only reader is a linear layer under autocast can hand it
the float16 it would cast to (the same values, without the cast and its backward). Works under
``TRITONINTERPRET=1`` on CPU tensors (how the tests run).
"""

from __future__ import annotations

import functools

import torch

from .common import INTERPRET, cdiv, next_power_of_2, tl, triton

__all__ = ["layer_norm_rows", "is_available"]

_TILE_ELEMENTS = 4096


def is_available(device) -> bool:
    if triton is None:
        return False
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()) or (device.type == "cpu" and INTERPRET)


if triton is not None:

    @triton.jit
    def _row_block(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Rows of this program, columns, their masks and the element offsets of the block."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask_r = rows < n_rows
        mask_c = cols < n_cols
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        return rows, cols, mask_r, mask_c, mask_r[:, None] & mask_c[None, :], offs

    @triton.jit
    def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, eps,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, cols, mask_r, mask_c, mask, offs = _row_block(n_rows, n_cols, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0)
        b = tl.load(b_ptr + cols, mask=mask_c, other=0.0)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y, mask=mask)
        tl.store(mean_ptr + rows, mean, mask=mask_r)
        tl.store(rstd_ptr + rows, rstd, mask=mask_r)

    @triton.jit
    def _ln_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                       n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """dx per row; dw, db summed over the program's rows into one partial row each."""
        pid = tl.program_id(0)
        rows, cols, mask_r, mask_c, mask, offs = _row_block(n_rows, n_cols, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wg = g * w[None, :]
        mean_wg_xhat = tl.sum(wg * xhat, axis=1) / n_cols
        mean_wg = tl.sum(wg, axis=1) / n_cols
        dx = (wg - xhat * mean_wg_xhat[:, None] - mean_wg[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx, mask=mask)
        tl.store(dw_part_ptr + pid * n_cols + cols, tl.sum(g * xhat, axis=0), mask=mask_c)
        tl.store(db_part_ptr + pid * n_cols + cols, tl.sum(g, axis=0), mask=mask_c)


@functools.lru_cache(maxsize=None)
def _launch_shape(n_cols):
    block_c = next_power_of_2(n_cols)
    block_r = max(1, _TILE_ELEMENTS // block_c)
    num_warps = 4 if block_c * block_r <= 4096 else 8
    return block_r, block_c, num_warps


class _LayerNormRows(torch.autograd.Function):
    # No custom_fwd / custom_bwd: nothing here is autocast-sensitive (the kernel takes any input
    # dtype), and entering autocast for every backward cost host time.
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x = x.contiguous()
        n_rows, n_cols = x.shape
        block_r, block_c, num_warps = _launch_shape(n_cols)
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        # Few, shared allocations: the host time per call matters (96 calls per training step).
        mean, rstd = torch.empty(2, n_rows, dtype=torch.float32, device=x.device)
        w = weight.float().contiguous()
        _ln_fwd_kernel[(cdiv(n_rows, block_r),)](
            x, w, bias.float().contiguous(), y, mean, rstd, n_rows, n_cols, eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x.shape
        block_r, block_c, num_warps = _launch_shape(n_cols)
        programs = cdiv(n_rows, block_r)
        dx = torch.empty_like(x)
        parts = torch.empty(2, programs, n_cols, dtype=torch.float32, device=x.device)
        _ln_bwd_kernel[(programs,)](x, w, dy.contiguous(), mean, rstd, dx, parts[0], parts[1], n_rows, n_cols,
                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
        dweight, dbias = parts.sum(1)
        if dweight.dtype != ctx.weight_dtype:
            dweight = dweight.to(ctx.weight_dtype)
        if dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None


def layer_norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last axis of a (rows, C) tensor, like ``F.layer_norm(x, (C,), weight, bias, eps)``.

    The result has ``out_dtype`` if given, else float32 under CUDA autocast, else x's dtype.
    """
    if triton is None:
        raise RuntimeError("layer_norm_rows needs the triton package")
    if x.dim() != 2:
        raise ValueError(f"layer_norm_rows expects (rows, C), got {tuple(x.shape)}")
    if out_dtype is None:
        out_dtype = torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    return _LayerNormRows.apply(x, weight, bias, float(eps), out_dtype)
