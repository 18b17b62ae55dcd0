"""Host side of the Triton selective scan: allocate buffers, pick the kernels, launch them.

``scan_forward`` / ``scan_backward`` run one scan call with a ``ScanLaunch`` (tuning.py): the chunk
passes when the sequence is cut into several chunks, then the output pass of the N = 1 kernels
(scan_n1.py) or of the any-N kernels (chunked_scan.py).
"""

from __future__ import annotations

import torch

# Kernels are looked up on their modules at launch time: without triton they do not exist, and
# this module must still import (the backend then reports itself unavailable).
from . import chunked_scan as _any_n
from . import scan_n1 as _n1
from .common import cdiv, next_power_of_2, register_cap

__all__ = ["scan_forward", "scan_backward"]


_NO_MAP = (0, 0, 0, 0, 0, 0)


def _map_args(u):
    """(H, W) and element strides of the (B, D, H, W) map a MAP_IO launch reads u from."""
    if u.dim() != 4:
        return _NO_MAP
    return (u.shape[2], u.shape[3], *u.stride())


def _bc_stride(B, C):
    """Elements between the (batch, group) rows of d_state = 1 B and C: they may be views of a wider
    tensor (the routed projections) as long as both step alike."""
    batch, groups, d_state, length = B.shape
    stride = B.stride(1)
    if (d_state != 1 or C.stride() != B.stride() or B.stride(3) != 1 or B.stride(0) != groups * stride
            or stride < length):
        raise ValueError("B and C must be (batch, groups, 1, L) rows at one common stride")
    return stride


def scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg, store_states,
                  dt_proj=None):
    """y, and the state entering every BLOCK_T tile (None unless store_states).

    u is either (B, K*D, L) like delta, or the (B, D, H, W) map the four groups (K = 4) read along
    their cross-scan routes; y is (B, K*D, L) in sequence order either way. ``dt_proj`` = W, a
    (K*D, R) float32 dt_projs_weight: delta is then (B, K, R, L) (a view whose rows step like B's)
    and the kernel forms W @ delta itself (d_state = 1, one chunk, no stored states).
    """
    block_d, block_n, block_t, chunk_len, n_chunks, n_blocks, num_warps = cfg[:7]
    batch, groups, _, length = B.shape
    channels, d_state = A.shape
    map_io = u.dim() == 4
    map_args = _map_args(u)
    if map_io and d_state != 1:
        raise ValueError("reading u from the map is implemented for d_state = 1 only")
    if dt_proj is not None and (d_state != 1 or n_chunks > 1 or store_states):
        raise ValueError("the in-kernel dt projection needs d_state = 1, one chunk and no stored states")
    per_group = channels // groups
    grid = (batch * groups * n_blocks, n_chunks)
    f32 = dict(dtype=torch.float32, device=u.device)
    shape_args = (length, chunk_len, n_chunks, n_blocks, groups, per_group, d_state)
    h_in = None
    if n_chunks > 1:
        end_state = torch.empty(batch, channels, n_chunks, d_state, **f32)
        dt_sum = torch.empty(batch, channels, n_chunks, **f32)
        # The chunk passes take B and C as their own contiguous tensors (no row-stride argument).
        _any_n._scan_chunk_state_kernel[grid](
            u, delta, A, B.contiguous(), delta_bias if delta_bias is not None else A, end_state, dt_sum,
            *shape_args, *map_args,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t, MAP_IO=map_io, num_warps=num_warps)
        h_in = torch.empty_like(end_state)
        _launch_carry(end_state, dt_sum, A, h_in, reverse=False)
    n_tiles_total = -(-length // block_t)
    tile_state = torch.empty(batch, channels, n_tiles_total, d_state, **f32) if store_states else None
    y = torch.empty(batch, channels, length, dtype=output_dtype, device=u.device)
    args = (u, delta, A, B, C, D if D is not None else A, delta_bias if delta_bias is not None else A,
            h_in if h_in is not None else A, y, tile_state if store_states else A,
            length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, per_group)
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_INIT=h_in is not None,
                 SOFTPLUS=delta_softplus, STORE_STATES=store_states, BLOCK_D=block_d, BLOCK_T=block_t,
                 num_warps=num_warps)
    if d_state == 1:
        # The N = 1 kernel also takes the dt projection's weight (A as a stand-in when unused).
        pointers, sizes = args[:10], args[10:]
        rank = 0 if dt_proj is None else dt_proj.shape[1]
        _n1._scan_fwd_n1_kernel[grid](*pointers, A if dt_proj is None else dt_proj, *sizes, *map_args, _bc_stride(B, C),
                                  rank, **flags, MAP_IO=map_io, PREFETCH=cfg.prefetch, DT_PROJ=dt_proj is not None,
                                  **register_cap(cfg.maxnreg))
    else:
        _any_n._scan_fwd_kernel[grid](*args, d_state, BLOCK_N=block_n, **flags)
    return y, tile_state


def _launch_carry(local, dt_sum, A, carry, reverse):
    batch, channels, n_chunks, d_state = local.shape
    rows = batch * channels
    block_n = next_power_of_2(d_state)
    block_r = max(1, min(128, 2048 // block_n))
    _any_n._chunk_carry_kernel[(cdiv(rows, block_r),)](
        local, dt_sum, A, carry, rows, channels, n_chunks, d_state,
        REVERSE=reverse, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)


def scan_backward(u, delta, A, B, C, D, delta_bias, tile_state, dy, delta_softplus, cfg):
    """Gradients of every scan input from sequence-ordered u (B, K*D, L) and dy; du in the same order."""
    # Same tiles along L as the forward (tile_state is per tile); its own channel blocks and warps.
    block_n, block_t, chunk_len, n_chunks = cfg.block_n, cfg.block_t, cfg.chunk_len, cfg.n_chunks
    block_d, num_warps = cfg.bwd_block_d, cfg.bwd_num_warps
    batch, channels, length = delta.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    n_blocks = -(-per_group // block_d)
    grid = (batch * groups * n_blocks, n_chunks)
    f32 = dict(dtype=torch.float32, device=u.device)
    shape_args = (length, chunk_len, n_chunks, n_blocks, groups, per_group, d_state)
    dummy = A
    dh_in = None
    if n_chunks > 1:
        end_grad = torch.empty(batch, channels, n_chunks, d_state, **f32)
        dt_sum = torch.empty(batch, channels, n_chunks, **f32)
        _any_n._scan_bwd_chunk_kernel[grid](
            delta, A, C.contiguous(), delta_bias if delta_bias is not None else dummy, dy, end_grad, dt_sum,
            *shape_args, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps)
        dh_in = torch.empty_like(end_grad)
        _launch_carry(end_grad, dt_sum, A, dh_in, reverse=True)
    n_tiles_total = -(-length // block_t)
    du = torch.empty(batch, channels, length, dtype=u.dtype, device=u.device)
    ddelta = torch.empty_like(delta)
    if d_state == 1:
        # One slice per channel block, every element written by the kernel, summed below.
        dB = torch.empty((n_blocks,) + B.shape, **f32)
        dC = torch.empty((n_blocks,) + C.shape, **f32)
    else:
        dB = torch.zeros(B.shape, **f32)
        dC = torch.zeros(C.shape, **f32)
    dA_part = torch.empty(batch * n_chunks, channels, d_state, **f32)
    dD_part = torch.empty(batch * n_chunks, channels, **f32)
    dbias_part = torch.empty(batch * n_chunks, channels, **f32)
    args = (u, delta, A, B, C, D if D is not None else dummy, delta_bias if delta_bias is not None else dummy,
            dy, dh_in if dh_in is not None else dummy,
            tile_state, du, ddelta, dB, dC, dA_part, dD_part, dbias_part,
            length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, per_group)
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_INIT=n_chunks > 1,
                 SOFTPLUS=delta_softplus, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=num_warps)
    if d_state == 1:
        _n1._scan_bwd_n1_kernel[grid](*args, B.numel(), _bc_stride(B, C), **flags, **register_cap(cfg.bwd_maxnreg))
    else:
        _any_n._scan_bwd_kernel[grid](*args, d_state, BLOCK_N=block_n, **flags)
    if d_state == 1:
        dB, dC = (dB[0], dC[0]) if n_blocks == 1 else (dB.sum(0), dC.sum(0))
    dA = dA_part.sum(0)
    dD = dD_part.sum(0) if D is not None else None
    dbias = dbias_part.sum(0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dbias
