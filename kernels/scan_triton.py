"""Triton selective scan (forward and backward) and cross-scan / cross-merge for CUDA tensors.

Backend ``"triton"`` of :mod:`vmamba_cli.kernels`. The scan follows spec §5.2 with VMamba's shapes::

    u, delta   (batch, K*D, L)   float32 / float16 / bfloat16
    A          (K*D, N)          float32
    B, C       (batch, K, N, L)  shared by the D channels of group k
    D, delta_bias (K*D,)         float32, optional

Design (one program = one batch element, one block of channels inside one group, one chunk of L):

* The sequence is walked in tiles of BLOCK_T steps: u, delta, B, C are loaded as
  ``[BLOCK_D, BLOCK_T]`` tiles (each channel's L is contiguous, so loads and stores coalesce),
  softplus, the decays ``exp(dt*A)`` and the drives ``dt*u*B`` are formed tile-wide, and the
  recurrence ``h_t = decay_t * h_{t-1} + drive_t`` over the tile is one ``tl.associative_scan`` of
  (decay, drive) pairs (composition of affine maps), plus the decayed state entering the tile. y is
  ``sum_n h * C + D*u``, one coalesced store per tile; the state leaving the tile is its last
  column. N = 1 (the v2 models) has its own 2-D kernels; N > 1 carries ``[BLOCK_D, N, BLOCK_T]``
  tiles. The loop over tiles is a runtime loop, so compile time does not grow with L.
* Long sequences are cut into chunks so that batch 1 at L = 65,536 still fills the GPU: a state pass
  scans every chunk from zero and emits its end state and ``sum(dt)`` (the chunk's decay is
  ``exp(A * sum(dt))``), a tiny carry pass chains the chunks, and the output pass rescans each chunk
  from its true incoming state (FLA ``hgrn/chunk`` style). With enough (batch, channel-block)
  programs there is one chunk and the first two passes are skipped.
* No per-step states: when a backward can follow, the forward keeps the state entering each tile
  (one per BLOCK_T = 32 steps, ``(batch, K*D, L/BLOCK_T, N)`` float32). The backward walks the tiles
  right to left: it rebuilds the tile's states from that entry state with one forward scan, gets
  ``dh_t = g_t C_t + exp(dt_{t+1} A) dh_{t+1}`` from one reverse associative scan (the decay of step
  t+1 re-read from delta one step along), and takes ``exp(dt_t A) h_{t-1}`` as ``h_t - drive_t``, so
  every other gradient is element-wise. Long sequences add a reverse chunk pass for dh, like the
  forward. du and ddelta are stored tile-wise; dB and dC are reduced over the tile's channels and
  added atomically (several channel blocks share a group); dA, dD and ddelta_bias are per-program
  partials summed by torch afterwards.
* Launch shapes (``choose_scan_config``) come from sweeps on an H200: inference and training use
  different tiles, and the backward has its own channel block, warps and register cap.
* The fused SS2D core (``cross_selective_scan``, d_state = 1): with ``MAP_IO`` the kernels read u
  (and, in a backward, dy) from the (B, D, H, W) map along each group's cross-scan route, so the
  four sequence-ordered copies of the map are never built; the x projection runs on the map and
  only its small output is laid out along the routes (``_route_kernel``).

Works under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests run); that path is for testing only.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["selective_scan", "cross_scan", "cross_merge", "cross_selective_scan", "is_available",
           "choose_scan_config"]

# Interpreter mode is fixed when triton is imported (machine-facts §1); only then can CPU tensors run.
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device) -> bool:
    """True for CUDA tensors when triton imports; for CPU tensors only under TRITON_INTERPRET=1.

    The ``auto`` order for CPU tensors prefers other backends, so the interpreter is used on CPU only
    when ``backend="triton"`` is asked for explicitly (the tests do).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRET


# ----------------------------------------------------------------------------------------------
# Scan kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _compose(decay_left, drive_left, decay_right, drive_right):
        # Steps are affine maps h -> decay * h + drive; this applies the left one, then the right one.
        return decay_left * decay_right, drive_left * decay_right + drive_right

    @triton.jit
    def _route_offsets(t, route, height, width, stride_h, stride_w):
        """Offsets in a (B, D, H, W) map (element strides) of the pixels at sequence positions t of
        scan route 0-3 (spec §3.7): h*W+w, w*H+h and their mirrors L-1-(...)."""
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
    def _state_block(A_ptr, batch, group, channels, mask_d, groups, channels_per_group, d_state, length,
                     BLOCK_N: tl.constexpr):
        """What every N > 1 kernel derives first: state lanes and masks, A of the block's channels,
        and the offsets of the (batch, group) rows of B and C."""
        n_channels = groups * channels_per_group
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + channels[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0)
        bc_row = (batch * groups + group).to(tl.int64) * d_state * length + offs_n * length
        return n_channels, offs_n, mask_n, mask_dn, A, bc_row

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

    @triton.jit
    def _load_steps(u_ptr, delta_ptr, bias, u_offs, row, t, mask_d, stop, SOFTPLUS: tl.constexpr):
        """u, pre-activation and dt [BLOCK_D, BLOCK_T] of steps t, the masks, and the sequence offsets."""
        mask_t = t < stop
        mask = mask_d[:, None] & mask_t[None, :]
        offs = row[:, None] + t[None, :]
        u, pre, dt = _steps(tl.load(u_ptr + u_offs, mask=mask, other=0.0),
                            tl.load(delta_ptr + offs, mask=mask, other=0.0), bias, mask, SOFTPLUS)
        return u, pre, dt, mask_t, mask, offs

    @triton.jit
    def _load_tile(u_ptr, delta_ptr, bias, A, B_ptr, u_offs, row, bc_row, t, mask_d, mask_n, stop,
                   SOFTPLUS: tl.constexpr):
        """u, pre-activation, dt, B tiles of steps t and the decay / drive tiles [BLOCK_D, N, BLOCK_T]."""
        u, pre, dt, mask_t, mask, offs = _load_steps(u_ptr, delta_ptr, bias, u_offs, row, t, mask_d, stop, SOFTPLUS)
        Bt = tl.load(B_ptr + bc_row[:, None] + t[None, :], mask=mask_n[:, None] & mask_t[None, :],
                     other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, None, :] * A[:, :, None])
        drive = (dt * u)[:, None, :] * Bt[None, :, :]
        return u, pre, dt, Bt, decay, drive, mask

    @triton.jit
    def _next_decay(delta_ptr, bias, A, row, t, mask_d, stop, SOFTPLUS: tl.constexpr):
        """exp(dt_{t+1} A) for every step t of a tile, 1 where t + 1 is past the chunk's end.

        The backward's reverse recurrence dh_t = g_t C_t + exp(dt_{t+1} A) dh_{t+1} needs the decay of
        the step to the right; re-reading delta one step further along hits the cache.
        """
        mask = mask_d[:, None] & (t + 1 < stop)[None, :]
        pre = tl.load(delta_ptr + row[:, None] + (t + 1)[None, :], mask=mask, other=0.0).to(tl.float32)
        dt = tl.where(mask, _step_size(pre + bias[:, None], SOFTPLUS), 0.0)
        return tl.exp(dt[:, None, :] * A[:, :, None])

    @triton.jit
    def _column(x, offs_t, j):
        """x[:, :, j] of a [BLOCK_D, N, BLOCK_T] tile."""
        return tl.sum(tl.where((offs_t == j)[None, None, :], x, 0.0), axis=2)

    @triton.jit
    def _scan_chunk_state_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, delta_bias_ptr, end_state_ptr, dt_sum_ptr,
        length, chunk_len, n_chunks, n_blocks, groups, channels_per_group, d_state,
        map_h, map_w, su_b, su_c, su_h, su_w,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, MAP_IO: tl.constexpr,
    ):
        """Forward pass 1 (long sequences only): each chunk scanned from a zero state -> end state, sum(dt).

        MAP_IO: u is read from the (B, D, H, W) map along each group's route (see _io_offsets)."""
        batch, group, channels, mask_d = _program_coords(n_blocks, groups, channels_per_group, BLOCK_D)
        chunk = tl.program_id(1)
        n_channels, offs_n, mask_n, mask_dn, A, bc_row = _state_block(
            A_ptr, batch, group, channels, mask_d, groups, channels_per_group, d_state, length, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        bias = _per_channel(delta_bias_ptr, channels, mask_d, HAS_BIAS, BLOCK_D)
        row = (batch * n_channels + channels).to(tl.int64) * length
        start = chunk * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_d = channels - group * channels_per_group
        for t0 in range(start, stop, BLOCK_T):
            t = t0 + offs_t
            u_offs = _io_offsets(row, t, batch, group, offs_d, map_h, map_w, su_b, su_c, su_h, su_w, MAP_IO)
            _, _, dt, _, decay, drive, _ = _load_tile(
                u_ptr, delta_ptr, bias, A, B_ptr, u_offs, row, bc_row, t, mask_d, mask_n, stop, SOFTPLUS)
            decay_prefix, local = tl.associative_scan((decay, drive), 2, _compose)
            h = _column(local + decay_prefix * h[:, :, None], offs_t, BLOCK_T - 1)
            dt_sum += tl.sum(dt, axis=1)
        slot = (batch * n_channels + channels).to(tl.int64) * n_chunks + chunk
        tl.store(end_state_ptr + slot[:, None] * d_state + offs_n[None, :], h, mask=mask_dn)
        tl.store(dt_sum_ptr + slot, dt_sum, mask=mask_d)

    @triton.jit
    def _chunk_carry_kernel(
        local_ptr, dt_sum_ptr, A_ptr, carry_ptr, n_rows, n_channels, n_chunks, d_state,
        REVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Chain chunks: carry_in[j] = state entering chunk j; carry <- exp(A*sum dt_j)*carry + local_j.

        Rows are (batch, channel) pairs. REVERSE walks chunks from the last one (backward dh pass).
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < n_rows
        offs_n = tl.arange(0, BLOCK_N)
        mask = mask_r[:, None] & (offs_n < d_state)[None, :]
        channels = rows % n_channels
        A = tl.load(A_ptr + channels[:, None] * d_state + offs_n[None, :], mask=mask, other=0.0)
        carry = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        base = rows.to(tl.int64) * n_chunks
        for i in range(0, n_chunks):
            if REVERSE:
                j = n_chunks - 1 - i
            else:
                j = i
            slot = base + j
            offs = slot[:, None] * d_state + offs_n[None, :]
            tl.store(carry_ptr + offs, carry, mask=mask)
            dt_sum = tl.load(dt_sum_ptr + slot, mask=mask_r, other=0.0)
            local = tl.load(local_ptr + offs, mask=mask, other=0.0)
            carry = tl.exp(dt_sum[:, None] * A) * carry + local

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, h_in_ptr, y_ptr, tile_state_ptr,
        length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, channels_per_group, d_state,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
        STORE_STATES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Output pass: scan one chunk from its incoming state, writing y (+ D*u) tile by tile.

        Each tile's states come from one associative scan over its BLOCK_T steps (prefix products of
        the decays and the local states from zero), plus the decayed incoming state. STORE_STATES
        keeps the state entering every tile for the backward (1/BLOCK_T of the per-step states).
        """
        batch, group, channels, mask_d = _program_coords(n_blocks, groups, channels_per_group, BLOCK_D)
        chunk = tl.program_id(1)
        n_channels, offs_n, mask_n, mask_dn, A, bc_row = _state_block(
            A_ptr, batch, group, channels, mask_d, groups, channels_per_group, d_state, length, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        bias = _per_channel(delta_bias_ptr, channels, mask_d, HAS_BIAS, BLOCK_D)
        skip = _per_channel(D_ptr, channels, mask_d, HAS_D, BLOCK_D)
        pair = (batch * n_channels + channels).to(tl.int64)
        row = pair * length
        if HAS_INIT:
            slot = pair * n_chunks + chunk
            h = tl.load(h_in_ptr + slot[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0)
        else:
            h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        start = chunk * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        tile_rows = pair[:, None] * n_tiles_total * d_state + offs_n[None, :]
        for t0 in range(start, stop, BLOCK_T):
            t = t0 + offs_t
            if STORE_STATES:
                tl.store(tile_state_ptr + tile_rows + (t0 // BLOCK_T) * d_state, h, mask=mask_dn)
            u, _, _, _, decay, drive, mask = _load_tile(
                u_ptr, delta_ptr, bias, A, B_ptr, row[:, None] + t[None, :], row, bc_row, t, mask_d, mask_n, stop,
                SOFTPLUS)
            decay_prefix, local = tl.associative_scan((decay, drive), 2, _compose)
            states = local + decay_prefix * h[:, :, None]
            Ct = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=mask_n[:, None] & (t < stop)[None, :],
                         other=0.0).to(tl.float32)
            y = tl.sum(states * Ct[None, :, :], axis=1) + skip[:, None] * u
            tl.store(y_ptr + row[:, None] + t[None, :], y, mask=mask)
            h = _column(states, offs_t, BLOCK_T - 1)

    @triton.jit
    def _scan_bwd_chunk_kernel(
        delta_ptr, A_ptr, C_ptr, delta_bias_ptr, dy_ptr, end_grad_ptr, dt_sum_ptr,
        length, chunk_len, n_chunks, n_blocks, groups, channels_per_group, d_state,
        map_h, map_w, sg_b, sg_c, sg_h, sg_w,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, MAP_IO: tl.constexpr,
    ):
        """Backward pass 1 (long sequences only): reverse dh recurrence of each chunk from zero.

        Emits exp(dt_s*A) * dh_s at the chunk's first step s (what the chunk hands to its left
        neighbour) and sum(dt) over the chunk. MAP_IO: dy is read from the merged (B, D, H, W)
        gradient map along each group's route.
        """
        batch, group, channels, mask_d = _program_coords(n_blocks, groups, channels_per_group, BLOCK_D)
        chunk = tl.program_id(1)
        n_channels, offs_n, mask_n, mask_dn, A, bc_row = _state_block(
            A_ptr, batch, group, channels, mask_d, groups, channels_per_group, d_state, length, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        bias = _per_channel(delta_bias_ptr, channels, mask_d, HAS_BIAS, BLOCK_D)
        row = (batch * n_channels + channels).to(tl.int64) * length
        start = chunk * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        n_tiles = tl.cdiv(stop - start, BLOCK_T)
        dh_right = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        first_decay = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_d = channels - group * channels_per_group
        for i in range(0, n_tiles):
            t = start + (n_tiles - 1 - i) * BLOCK_T + offs_t
            mask = mask_d[:, None] & (t < stop)[None, :]
            pre = tl.load(delta_ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32) + bias[:, None]
            dt = tl.where(mask, _step_size(pre, SOFTPLUS), 0.0)
            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            next_decay = _next_decay(delta_ptr, bias, A, row, t, mask_d, stop, SOFTPLUS)
            g_offs = _io_offsets(row, t, batch, group, offs_d, map_h, map_w, sg_b, sg_c, sg_h, sg_w, MAP_IO)
            g = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_row[:, None] + t[None, :], mask=mask_n[:, None] & (t < stop)[None, :],
                         other=0.0).to(tl.float32)
            decay_suffix, local = tl.associative_scan((next_decay, g[:, None, :] * Ct[None, :, :]), 2, _compose,
                                                      reverse=True)
            dh_right = _column(local + decay_suffix * dh_right[:, :, None], offs_t, 0)
            first_decay = _column(decay, offs_t, 0)
            dt_sum += tl.sum(dt, axis=1)
        slot = (batch * n_channels + channels).to(tl.int64) * n_chunks + chunk
        tl.store(end_grad_ptr + slot[:, None] * d_state + offs_n[None, :], first_decay * dh_right, mask=mask_dn)
        tl.store(dt_sum_ptr + slot, dt_sum, mask=mask_d)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, dy_ptr, dh_in_ptr,
        tile_state_ptr, du_ptr, ddelta_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
        length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, channels_per_group, d_state,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Backward output pass for one chunk, tiles right to left: every gradient of spec §5.3.

        Per tile: the states are rebuilt from the stored tile-entry state (one forward associative
        scan), dh from a reverse associative scan of dh_t = g_t C_t + exp(dt_{t+1} A) dh_{t+1}; the rest
        is element-wise. exp(dt_t A) h_{t-1} is taken as h_t - dt_t u_t B_t, so no shifted states.
        """
        batch, group, channels, mask_d = _program_coords(n_blocks, groups, channels_per_group, BLOCK_D)
        chunk = tl.program_id(1)
        n_channels, offs_n, mask_n, mask_dn, A, bc_row = _state_block(
            A_ptr, batch, group, channels, mask_d, groups, channels_per_group, d_state, length, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        bias = _per_channel(delta_bias_ptr, channels, mask_d, HAS_BIAS, BLOCK_D)
        skip = _per_channel(D_ptr, channels, mask_d, HAS_D, BLOCK_D)
        pair = (batch * n_channels + channels).to(tl.int64)
        row = pair * length
        start = chunk * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        first_tile = start // BLOCK_T
        n_tiles = tl.cdiv(stop - start, BLOCK_T)
        tile_rows = pair[:, None] * n_tiles_total * d_state + offs_n[None, :]
        if HAS_INIT:
            slot = pair * n_chunks + chunk
            dh_right = tl.load(dh_in_ptr + slot[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0)
        else:
            dh_right = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n_tiles):
            tile = n_tiles - 1 - i
            t = start + tile * BLOCK_T + offs_t
            u, pre, dt, Bt, decay, drive, mask = _load_tile(
                u_ptr, delta_ptr, bias, A, B_ptr, row[:, None] + t[None, :], row, bc_row, t, mask_d, mask_n, stop,
                SOFTPLUS)
            h_entry = tl.load(tile_state_ptr + tile_rows + (first_tile + tile) * d_state, mask=mask_dn, other=0.0)
            decay_prefix, local = tl.associative_scan((decay, drive), 2, _compose)
            states = local + decay_prefix * h_entry[:, :, None]
            mask_nt = mask_n[:, None] & (t < stop)[None, :]
            offs = row[:, None] + t[None, :]
            bc_offs = bc_row[:, None] + t[None, :]
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_offs, mask=mask_nt, other=0.0).to(tl.float32)
            next_decay = _next_decay(delta_ptr, bias, A, row, t, mask_d, stop, SOFTPLUS)
            decay_suffix, dh_local = tl.associative_scan((next_decay, g[:, None, :] * Ct[None, :, :]), 2, _compose,
                                                         reverse=True)
            dh = dh_local + decay_suffix * dh_right[:, :, None]
            dh_right = _column(dh, offs_t, 0)

            dt_u = dt * u
            # Sums over the block's channels; other blocks of the same group add to the same entries.
            tl.atomic_add(dC_ptr + bc_offs, tl.sum(g[:, None, :] * states, axis=0), mask=mask_nt)
            tl.atomic_add(dB_ptr + bc_offs, tl.sum(dh * dt_u[:, None, :], axis=0), mask=mask_nt)
            through_decay = dh * (states - drive)
            dA_acc += tl.sum(through_decay * dt[:, None, :], axis=2)
            dh_B = tl.sum(dh * Bt[None, :, :], axis=1)
            du = dh_B * dt + skip[:, None] * g
            d_dt = tl.sum(through_decay * A[:, :, None], axis=1) + dh_B * u
            if SOFTPLUS:
                d_pre = tl.where(pre > 20.0, d_dt, d_dt * tl.sigmoid(pre))
            else:
                d_pre = d_dt
            d_pre = tl.where(mask, d_pre, 0.0)
            tl.store(du_ptr + offs, du, mask=mask)
            tl.store(ddelta_ptr + offs, d_pre, mask=mask)
            dD_acc += tl.sum(g * u, axis=1)
            dbias_acc += tl.sum(d_pre, axis=1)
        part = (batch * n_chunks + chunk).to(tl.int64) * n_channels + channels
        tl.store(dA_part_ptr + part[:, None] * d_state + offs_n[None, :], dA_acc, mask=mask_dn)
        tl.store(dD_part_ptr + part, dD_acc, mask=mask_d)
        tl.store(dbias_part_ptr + part, dbias_acc, mask=mask_d)

    # N = 1 (the v2 models): the same passes on [BLOCK_D, BLOCK_T] tiles, without the state axis.

    @triton.jit
    def _n1_block(A_ptr, D_ptr, delta_bias_ptr, n_blocks, groups, channels_per_group, length, chunk_len,
                  bc_stride, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_T: tl.constexpr):
        """What both N = 1 kernels derive first: the program's (batch, group, channel block, chunk)
        and the chunk's steps [start, stop), the block's A, delta_bias and D, its (batch, channel)
        pairs and their row offsets, and the (batch, group) row offset of B and C (rows
        ``bc_stride`` elements apart: L for their own tensors, more for views of a wider one)."""
        batch, group, channels, mask_d = _program_coords(n_blocks, groups, channels_per_group, BLOCK_D)
        chunk = tl.program_id(1)
        start = chunk * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        n_channels = groups * channels_per_group
        A = tl.load(A_ptr + channels, mask=mask_d, other=0.0)
        bias = _per_channel(delta_bias_ptr, channels, mask_d, HAS_BIAS, BLOCK_D)
        skip = _per_channel(D_ptr, channels, mask_d, HAS_D, BLOCK_D)
        pair = (batch * n_channels + channels).to(tl.int64)
        bc_row = (batch * groups + group).to(tl.int64) * bc_stride
        return (batch, group, channels, mask_d, chunk, start, stop, tl.arange(0, BLOCK_T), n_channels, A, bias,
                skip, pair, pair * length, bc_row)

    @triton.jit
    def _tile_io(t, lower, stop, row, mask_d, batch, group, offs_d, map_h, map_w, s_b, s_c, s_h, s_w,
                 MAP_IO: tl.constexpr):
        """Masks (steps lower <= t < stop), sequence offsets and u's offsets of the tile at steps t."""
        mask_t = (t >= lower) & (t < stop)
        mask = mask_d[:, None] & mask_t[None, :]
        offs = row[:, None] + t[None, :]
        u_offs = _io_offsets(row, t, batch, group, offs_d, map_h, map_w, s_b, s_c, s_h, s_w, MAP_IO)
        return mask_t, mask, offs, u_offs

    @triton.jit
    def _load_raw_n1(u_ptr, delta_ptr, B_ptr, C_ptr, u_offs, offs, bc_row, t, mask_t, mask,
                     LOAD_DELTA: tl.constexpr):
        """u, delta, B and C of one d_state = 1 tile as stored: loaded a tile ahead (PREFETCH), they
        stay narrow in registers while the tile before them is computed. Without LOAD_DELTA (the
        kernel projects delta itself) u stands in for delta and is never read as such."""
        u = tl.load(u_ptr + u_offs, mask=mask, other=0.0)
        if LOAD_DELTA:
            delta = tl.load(delta_ptr + offs, mask=mask, other=0.0)
        else:
            delta = u
        Bt = tl.load(B_ptr + bc_row + t, mask=mask_t, other=0.0)
        Ct = tl.load(C_ptr + bc_row + t, mask=mask_t, other=0.0)
        return u, delta, Bt, Ct

    @triton.jit
    def _load_raw_bwd_n1(u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, u_offs, g_offs, offs, bc_row, t, mask_t, mask,
                         mask_next):
        """_load_raw_n1 plus what only the backward reads: dy, and delta one step along (mask_next)."""
        u, delta, Bt, Ct = _load_raw_n1(u_ptr, delta_ptr, B_ptr, C_ptr, u_offs, offs, bc_row, t, mask_t, mask, True)
        g = tl.load(dy_ptr + g_offs, mask=mask, other=0.0)
        delta_next = tl.load(delta_ptr + offs + 1, mask=mask_next, other=0.0)
        return u, delta, Bt, Ct, g, delta_next

    @triton.jit
    def _dt_projection(dts_ptr, w_ptr, rank, dts_row, channels, mask_d, t, mask_t, length,
                       BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        """delta before its bias, [BLOCK_D, BLOCK_T]: dt_projs_weight (K*D, R) of the block's channels
        times the R low-rank rows of the (batch, group) at steps t. The rows are shared by every
        channel of the group, so the (B, K*D, L) delta tensor is never written or read."""
        pre = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        for r in range(rank):
            w = tl.load(w_ptr + channels * rank + r, mask=mask_d, other=0.0)
            d = tl.load(dts_ptr + dts_row + r * length + t, mask=mask_t, other=0.0).to(tl.float32)
            pre += w[:, None] * d[None, :]
        return pre

    @triton.jit
    def _scan_fwd_n1_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, h_in_ptr, y_ptr, tile_state_ptr, w_ptr,
        length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, channels_per_group,
        map_h, map_w, su_b, su_c, su_h, su_w, bc_stride, rank,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
        STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MAP_IO: tl.constexpr,
        PREFETCH: tl.constexpr, DT_PROJ: tl.constexpr,
    ):
        """_scan_fwd_kernel for d_state = 1; MAP_IO reads u from the (B, D, H, W) map (_io_offsets).

        PREFETCH issues the loads of the next tile before computing the current one, so that their
        latency overlaps the tile's scan instead of following it. DT_PROJ forms delta in the kernel
        (_dt_projection): delta_ptr then points at the (batch, group) rows of the ``rank`` low-rank
        step inputs, ``bc_stride`` apart like B and C, and w_ptr at dt_projs_weight (K*D, rank).
        """
        (batch, group, channels, mask_d, chunk, start, stop, offs_t, n_channels, A, bias, skip, pair, row,
         bc_row) = _n1_block(A_ptr, D_ptr, delta_bias_ptr, n_blocks, groups, channels_per_group, length, chunk_len,
                             bc_stride, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_T)
        if HAS_INIT:
            h = tl.load(h_in_ptr + pair * n_chunks + chunk, mask=mask_d, other=0.0)
        else:
            h = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_d = channels - group * channels_per_group
        io = (row, mask_d, batch, group, offs_d, map_h, map_w, su_b, su_c, su_h, su_w)
        if PREFETCH:
            t = start + offs_t
            mask_t, mask, offs, u_offs = _tile_io(t, start, stop, *io, MAP_IO)
            u_ahead, delta_ahead, B_ahead, C_ahead = _load_raw_n1(
                u_ptr, delta_ptr, B_ptr, C_ptr, u_offs, offs, bc_row, t, mask_t, mask, not DT_PROJ)
        for t0 in range(start, stop, BLOCK_T):
            if STORE_STATES:
                tl.store(tile_state_ptr + pair * n_tiles_total + t0 // BLOCK_T, h, mask=mask_d)
            t = t0 + offs_t
            mask_t, mask, offs, u_offs = _tile_io(t, start, stop, *io, MAP_IO)
            if PREFETCH:
                u_raw, delta_raw, B_raw, C_raw = u_ahead, delta_ahead, B_ahead, C_ahead
                t_ahead = t + BLOCK_T
                mask_t_ahead, mask_ahead, offs_ahead, u_offs_ahead = _tile_io(t_ahead, start, stop, *io, MAP_IO)
                u_ahead, delta_ahead, B_ahead, C_ahead = _load_raw_n1(
                    u_ptr, delta_ptr, B_ptr, C_ptr, u_offs_ahead, offs_ahead, bc_row, t_ahead, mask_t_ahead,
                    mask_ahead, not DT_PROJ)
            else:
                u_raw, delta_raw, B_raw, C_raw = _load_raw_n1(
                    u_ptr, delta_ptr, B_ptr, C_ptr, u_offs, offs, bc_row, t, mask_t, mask, not DT_PROJ)
            if DT_PROJ:
                delta_raw = _dt_projection(delta_ptr, w_ptr, rank, bc_row, channels, mask_d, t, mask_t, length,
                                           BLOCK_D, BLOCK_T)
            u, pre, dt = _steps(u_raw, delta_raw, bias, mask, SOFTPLUS)
            decay = tl.exp(dt * A[:, None])
            decay_prefix, local = tl.associative_scan((decay, dt * u * B_raw.to(tl.float32)[None, :]), 1, _compose)
            states = local + decay_prefix * h[:, None]
            tl.store(y_ptr + offs, states * C_raw.to(tl.float32)[None, :] + skip[:, None] * u, mask=mask)
            h = tl.sum(tl.where((offs_t == BLOCK_T - 1)[None, :], states, 0.0), axis=1)

    @triton.jit
    def _scan_bwd_n1_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, dy_ptr, dh_in_ptr,
        tile_state_ptr, du_ptr, ddelta_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
        length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, channels_per_group,
        map_h, map_w, su_b, su_c, su_h, su_w, sg_b, sg_c, sg_h, sg_w, bc_block_stride, bc_stride,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MAP_IO: tl.constexpr, PREFETCH: tl.constexpr,
        BC_PARTIALS: tl.constexpr,
    ):
        """_scan_bwd_kernel for d_state = 1; MAP_IO reads u from the (B, D, H, W) map and dy from the
        merged gradient map (_io_offsets). du and ddelta are written in sequence order either way.
        PREFETCH loads the tile to the left (the next one walked) before computing the current one."""
        (batch, group, channels, mask_d, chunk, start, stop, offs_t, n_channels, A, bias, skip, pair, row,
         bc_row) = _n1_block(A_ptr, D_ptr, delta_bias_ptr, n_blocks, groups, channels_per_group, length, chunk_len,
                             bc_stride, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_T)
        # dB and dC are their own (B, K, 1, L) tensors (or partial buffers of them), whatever B's stride.
        bc_out = (batch * groups + group).to(tl.int64) * length
        first_tile = start // BLOCK_T
        n_tiles = tl.cdiv(stop - start, BLOCK_T)
        if HAS_INIT:
            dh_right = tl.load(dh_in_ptr + pair * n_chunks + chunk, mask=mask_d, other=0.0)
        else:
            dh_right = tl.zeros([BLOCK_D], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        offs_d = channels - group * channels_per_group
        io = (row, mask_d, batch, group, offs_d, map_h, map_w, su_b, su_c, su_h, su_w)
        if PREFETCH:
            t = start + (n_tiles - 1) * BLOCK_T + offs_t
            mask_t, mask, offs, u_offs = _tile_io(t, start, stop, *io, MAP_IO)
            g_offs = _io_offsets(row, t, batch, group, offs_d, map_h, map_w, sg_b, sg_c, sg_h, sg_w, MAP_IO)
            mask_next = mask_d[:, None] & (t + 1 < stop)[None, :]
            u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead = _load_raw_bwd_n1(
                u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, u_offs, g_offs, offs, bc_row, t, mask_t, mask, mask_next)
        for i in range(0, n_tiles):
            tile = n_tiles - 1 - i
            t = start + tile * BLOCK_T + offs_t
            mask_t, mask, offs, u_offs = _tile_io(t, start, stop, *io, MAP_IO)
            mask_next = mask_d[:, None] & (t + 1 < stop)[None, :]
            if PREFETCH:
                u_raw, delta_raw, B_raw, C_raw, g_raw, delta_next_raw = (
                    u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead)
                t_ahead = t - BLOCK_T
                mask_t_ahead, mask_ahead, offs_ahead, u_offs_ahead = _tile_io(t_ahead, start, stop, *io, MAP_IO)
                g_offs_ahead = _io_offsets(row, t_ahead, batch, group, offs_d, map_h, map_w, sg_b, sg_c, sg_h, sg_w,
                                           MAP_IO)
                # The tile to the left ends where this one starts, so its step-along delta is in the chunk.
                u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead = _load_raw_bwd_n1(
                    u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, u_offs_ahead, g_offs_ahead, offs_ahead, bc_row, t_ahead,
                    mask_t_ahead, mask_ahead, mask_ahead)
            else:
                g_offs = _io_offsets(row, t, batch, group, offs_d, map_h, map_w, sg_b, sg_c, sg_h, sg_w, MAP_IO)
                u_raw, delta_raw, B_raw, C_raw, g_raw, delta_next_raw = _load_raw_bwd_n1(
                    u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, u_offs, g_offs, offs, bc_row, t, mask_t, mask, mask_next)
            u, pre, dt = _steps(u_raw, delta_raw, bias, mask, SOFTPLUS)
            Bt = B_raw.to(tl.float32)
            Ct = C_raw.to(tl.float32)
            g = g_raw.to(tl.float32)
            pre_next = delta_next_raw.to(tl.float32) + bias[:, None]
            next_decay = tl.exp(tl.where(mask_next, _step_size(pre_next, SOFTPLUS), 0.0) * A[:, None])
            decay = tl.exp(dt * A[:, None])
            drive = dt * u * Bt[None, :]
            h_entry = tl.load(tile_state_ptr + pair * n_tiles_total + first_tile + tile, mask=mask_d, other=0.0)
            decay_prefix, local = tl.associative_scan((decay, drive), 1, _compose)
            states = local + decay_prefix * h_entry[:, None]
            decay_suffix, dh_local = tl.associative_scan((next_decay, g * Ct[None, :]), 1, _compose, reverse=True)
            dh = dh_local + decay_suffix * dh_right[:, None]
            dh_right = tl.sum(tl.where((offs_t == 0)[None, :], dh, 0.0), axis=1)

            # Sums over the block's channels. Other blocks of the same group add to the same entries,
            # or (BC_PARTIALS) write their own slice of a (blocks, B, K, 1, L) buffer summed later:
            # no atomics, so dB and dC come out the same on every run.
            if BC_PARTIALS:
                bc_slot = (tl.program_id(0) % n_blocks).to(tl.int64) * bc_block_stride + bc_out + t
                tl.store(dC_ptr + bc_slot, tl.sum(g * states, axis=0), mask=mask_t)
                tl.store(dB_ptr + bc_slot, tl.sum(dh * dt * u, axis=0), mask=mask_t)
            else:
                tl.atomic_add(dC_ptr + bc_out + t, tl.sum(g * states, axis=0), mask=mask_t)
                tl.atomic_add(dB_ptr + bc_out + t, tl.sum(dh * dt * u, axis=0), mask=mask_t)
            through_decay = dh * (states - drive)
            dA_acc += tl.sum(through_decay * dt, axis=1)
            dh_B = dh * Bt[None, :]
            d_dt = through_decay * A[:, None] + dh_B * u
            if SOFTPLUS:
                d_pre = tl.where(pre > 20.0, d_dt, d_dt * tl.sigmoid(pre))
            else:
                d_pre = d_dt
            d_pre = tl.where(mask, d_pre, 0.0)
            tl.store(du_ptr + offs, dh_B * dt + skip[:, None] * g, mask=mask)
            tl.store(ddelta_ptr + offs, d_pre, mask=mask)
            dD_acc += tl.sum(g * u, axis=1)
            dbias_acc += tl.sum(d_pre, axis=1)
        part = (batch * n_chunks + chunk).to(tl.int64) * n_channels + channels
        tl.store(dA_part_ptr + part, dA_acc, mask=mask_d)
        tl.store(dD_part_ptr + part, dD_acc, mask=mask_d)
        tl.store(dbias_part_ptr + part, dbias_acc, mask=mask_d)

# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Elements of one [BLOCK_D, N, BLOCK_T] tile; the backward keeps about eight such tiles live.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_D = 64
_MIN_CHUNK = 256
_PROGRAMS_PER_SM = 4


def _cdiv(a: int, b: int) -> int:
    # Plain integers: Triton's cdiv is a @triton.jit function, and calling one from Python costs
    # about 20 us of host time (grids are computed several times per block and step).
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# N = 1 launches, the fastest measured on an H200 (docs/kernels-gpu.md): forward tiles
# (BLOCK_T, BLOCK_D, num_warps, maxnreg) without and with a backward to follow, and the backward's
# (BLOCK_D, num_warps, maxnreg) on the training tiles. maxnreg caps registers per thread (None: the
# compiler's choice), trading spills for more resident programs.
N1_INFERENCE_TILES = (128, 8, 2, None)
N1_TRAINING_TILES = (64, 8, 2, 64)
N1_BACKWARD_LAUNCH = (4, 1, None)
# The same for the fused SS2D core, whose kernels read u (and dy) from the map (MAP_IO).
N1_MAP_INFERENCE_TILES = (64, 8, 2, 80)
N1_MAP_TRAINING_TILES = (64, 16, 2, 96)
N1_MAP_BACKWARD_LAUNCH = (8, 2, 96)
# Whether the N = 1 kernels load each tile one iteration ahead (PREFETCH): the forward without and
# with a backward to follow, and the backward (`bench_scan_gpu.py --prefetch-sweep --pick`: the
# inference forward 0.39 instead of 0.44 ms, the fused core's 0.50 instead of 0.61; no gain for the
# training forward).
N1_PREFETCH = True
N1_TRAINING_PREFETCH = False
N1_BACKWARD_PREFETCH = True
# Whether the N = 1 backward writes per-channel-block dB / dC partials, summed afterwards, instead of
# adding them atomically: faster in every swept launch (stage 0: 1.42 vs 1.73 ms at d4/w1) and the
# same bits on every run.
N1_BACKWARD_BC_PARTIALS = True


class ScanLaunch(NamedTuple):
    """Launch configuration of one scan call (forward; ``bwd_*`` for its backward)."""

    block_d: int
    block_n: int
    block_t: int
    chunk_len: int
    n_chunks: int
    n_blocks: int
    num_warps: int
    maxnreg: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None
    bwd_maxnreg: int | None = None
    prefetch: bool = False
    bwd_prefetch: bool = False
    bwd_bc_partials: bool = False


def _default_tiles(block_n: int, training: bool, map_io: bool = False) -> tuple[int, int, int, int | None]:
    """(BLOCK_T, largest BLOCK_D, num_warps, maxnreg) of the forward.

    N = 1: inference runs long tiles over few channels; when a backward follows, the forward must
    use the backward's tile length (it stores the state entering each tile), and the backward is
    fastest on short tiles. N > 1 multiplies the tile by N, so tiles get shorter.
    """
    if block_n == 1 and map_io:
        return N1_MAP_TRAINING_TILES if training else N1_MAP_INFERENCE_TILES
    if block_n == 1:
        return N1_TRAINING_TILES if training else N1_INFERENCE_TILES
    block_t = 32 if block_n <= 4 else 16
    return block_t, max(1, min(_MAX_BLOCK_D, _TILE_ELEMENTS // (block_n * block_t))), 4, None


def _split_channels(channels_per_group: int, largest: int) -> int:
    """The largest power-of-two block <= largest that leaves at most 1/8 of the lanes masked off."""
    block_d = min(largest, _next_power_of_2(channels_per_group))
    while block_d > 8:
        blocks = -(-channels_per_group // block_d)
        if blocks * block_d - channels_per_group <= channels_per_group // 8:
            break
        block_d //= 2
    return block_d


def choose_scan_config(batch, groups, channels_per_group, d_state, length, device="cpu",
                       chunk_size=None, block_d=None, block_t=None, sm_count=None, num_warps=None,
                       training=False, map_io=False) -> ScanLaunch:
    """Launch configuration of a scan call.

    Tiles (BLOCK_T steps x BLOCK_D channels), warps and register caps come from ``_default_tiles``
    and ``N1_BACKWARD_LAUNCH``; BLOCK_D is halved until a group's channels split with at most 1/8
    of the lanes masked off. Chunks: enough (batch, channel block, chunk) programs for about four
    per SM, no chunk shorter than 256 steps, so that batch 128 at 224x224 runs one chunk (no carry
    passes) and batch 1 at L = 65,536 many. ``training`` picks the tiles for a forward that a
    backward will follow, ``map_io`` those of the fused SS2D core (u read from the map). Explicit
    ``block_d`` / ``num_warps`` apply to the forward and backward.
    """
    block_n = _next_power_of_2(d_state)
    default_t, default_d, default_warps, maxnreg = _default_tiles(block_n, training, map_io)
    # Short sequences (the last stages) get tiles no longer than themselves.
    block_t = block_t or min(default_t, max(16, _next_power_of_2(length)))
    explicit_d, explicit_warps = block_d, num_warps
    num_warps = num_warps or default_warps
    block_d = block_d or _split_channels(channels_per_group, default_d)
    if block_n == 1:
        bwd_d, bwd_warps, bwd_maxnreg = N1_MAP_BACKWARD_LAUNCH if map_io else N1_BACKWARD_LAUNCH
        bwd_d = explicit_d or _split_channels(channels_per_group, bwd_d)
        bwd_warps = explicit_warps or bwd_warps
    else:
        bwd_d, bwd_warps, bwd_maxnreg = block_d, num_warps, maxnreg
    if explicit_d or explicit_warps:
        maxnreg = bwd_maxnreg = None
    n_blocks = -(-channels_per_group // block_d)
    if chunk_size is None:
        sm_count = sm_count or _sm_count(torch.device(device))
        programs = batch * groups * n_blocks
        wanted = max(1, -(-_PROGRAMS_PER_SM * sm_count // programs))
        n_chunks = max(1, min(wanted, length // _MIN_CHUNK))
        # Several chunks: rounded down to whole tiles, so there are at least as many as asked for.
        chunk_size = length if n_chunks == 1 else max(block_t, length // n_chunks // block_t * block_t)
    chunk_len = max(block_t, -(-chunk_size // block_t) * block_t)
    n_chunks = -(-length // chunk_len)
    n1 = block_n == 1
    return ScanLaunch(block_d, block_n, block_t, chunk_len, n_chunks, n_blocks, num_warps, maxnreg,
                      bwd_d, bwd_warps, bwd_maxnreg, n1 and (N1_TRAINING_PREFETCH if training else N1_PREFETCH), n1 and N1_BACKWARD_PREFETCH,
                      n1 and N1_BACKWARD_BC_PARTIALS)


def _register_cap(maxnreg):
    return {} if maxnreg is None or _INTERPRET else {"maxnreg": maxnreg}


_NO_MAP = (0, 0, 0, 0, 0, 0)


def _map_args(u, dy=None):
    """(H, W) and element strides of the (B, D, H, W) maps a MAP_IO launch reads u (and dy) from."""
    if u.dim() != 4:
        return _NO_MAP + ((0, 0, 0, 0) if dy is not None else ())
    args = (u.shape[2], u.shape[3], *u.stride())
    return args + (tuple(dy.stride()) if dy is not None else ())


def _bc_stride(B, C):
    """Elements between the (batch, group) rows of d_state = 1 B and C: they may be views of a wider
    tensor (the routed projections) as long as both step alike."""
    batch, groups, d_state, length = B.shape
    stride = B.stride(1)
    if (d_state != 1 or C.stride() != B.stride() or B.stride(3) != 1 or B.stride(0) != groups * stride
            or stride < length):
        raise ValueError("B and C must be (batch, groups, 1, L) rows at one common stride")
    return stride


def _scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg, store_states,
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
        _scan_chunk_state_kernel[grid](
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
        _scan_fwd_n1_kernel[grid](*pointers, A if dt_proj is None else dt_proj, *sizes, *map_args, _bc_stride(B, C),
                                  rank, **flags, MAP_IO=map_io, PREFETCH=cfg.prefetch, DT_PROJ=dt_proj is not None,
                                  **_register_cap(cfg.maxnreg))
    else:
        _scan_fwd_kernel[grid](*args, d_state, BLOCK_N=block_n, **flags)
    return y, tile_state


def _launch_carry(local, dt_sum, A, carry, reverse):
    batch, channels, n_chunks, d_state = local.shape
    rows = batch * channels
    block_n = _next_power_of_2(d_state)
    block_r = max(1, min(128, 2048 // block_n))
    _chunk_carry_kernel[(_cdiv(rows, block_r),)](
        local, dt_sum, A, carry, rows, channels, n_chunks, d_state,
        REVERSE=reverse, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4)


def _scan_backward(u, delta, A, B, C, D, delta_bias, tile_state, dy, delta_softplus, cfg):
    """Gradients of every scan input; du is (B, K*D, L) in sequence order.

    With u a (B, D, H, W) map (see _scan_forward), dy is the gradient of the merged (B, D, H, W)
    output, read by every group along its route: the cross-merge's backward is never built.
    """
    # Same tiles along L as the forward (tile_state is per tile); its own channel blocks and warps.
    block_n, block_t, chunk_len, n_chunks = cfg.block_n, cfg.block_t, cfg.chunk_len, cfg.n_chunks
    block_d, num_warps = cfg.bwd_block_d, cfg.bwd_num_warps
    batch, channels, length = delta.shape
    map_io = u.dim() == 4
    map_args = _map_args(u, dy)
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
        _scan_bwd_chunk_kernel[grid](
            delta, A, C.contiguous(), delta_bias if delta_bias is not None else dummy, dy, end_grad, dt_sum,
            *shape_args, *map_args[:2], *map_args[6:],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t, MAP_IO=map_io, num_warps=num_warps)
        dh_in = torch.empty_like(end_grad)
        _launch_carry(end_grad, dt_sum, A, dh_in, reverse=True)
    n_tiles_total = -(-length // block_t)
    du = torch.empty(batch, channels, length, dtype=u.dtype, device=u.device)
    ddelta = torch.empty_like(delta)
    bc_partials = d_state == 1 and cfg.bwd_bc_partials and n_blocks > 1
    if bc_partials:
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
        _scan_bwd_n1_kernel[grid](*args, *map_args, B.numel(), _bc_stride(B, C), **flags, MAP_IO=map_io,
                                  PREFETCH=cfg.bwd_prefetch,
                                  BC_PARTIALS=bc_partials, **_register_cap(cfg.bwd_maxnreg))
    else:
        _scan_bwd_kernel[grid](*args, d_state, BLOCK_N=block_n, **flags)
    if bc_partials:
        dB, dC = dB.sum(0), dC.sum(0)
    dA = dA_part.sum(0)
    dD = dD_part.sum(0) if D is not None else None
    dbias = dbias_part.sum(0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dbias


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg):
        # Tile-entry states are kept only when a backward can follow.
        store_states = any(ctx.needs_input_grad[:7])
        y, tile_state = _scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, cfg,
                                      store_states)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, tile_state)
        ctx.delta_softplus = delta_softplus
        ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, tile_state = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias = _scan_backward(
            u, delta, A, B, C, D, delta_bias, tile_state, dy.contiguous(), ctx.delta_softplus, ctx.cfg)
        # A, D, delta_bias are float32 here; autograd carries their gradients back through .float().
        return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias, None, None, None)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                   output_dtype=torch.float32, chunk_size=None, block_d=None, block_t=None, num_warps=None):
    """Selective scan (spec §5.2) with a Triton forward and backward; float32 state.

    ``chunk_size`` / ``block_d`` / ``block_t`` / ``num_warps`` override the launch heuristic (tests
    use a small ``chunk_size`` to exercise the cross-chunk carry; the GPU benchmark sweeps the rest).
    ``block_t`` must be a power of two.
    """
    from .scan_torch import check_scan_shapes

    if triton is None:
        raise RuntimeError("the triton scan backend needs the triton package")
    groups = check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    batch, channels, length = u.shape
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    cfg = choose_scan_config(batch, groups, channels // groups, A.shape[1], length, u.device,
                             chunk_size, block_d, block_t, num_warps=num_warps, training=training)
    # A, D and delta_bias are float32 in VMamba; the kernels read them as float32.
    A_f = A.float().contiguous()
    D_f = None if D is None else D.float().contiguous()
    bias_f = None if delta_bias is None else delta_bias.float().contiguous()
    y = _TritonSelectiveScan.apply(
        u.contiguous(), delta.contiguous(), A_f, B.contiguous(), C.contiguous(), D_f, bias_f,
        bool(delta_softplus), output_dtype, cfg)
    return y


# ----------------------------------------------------------------------------------------------
# Cross-scan / cross-merge (spec §3.7): one permutation kernel for both directions
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cross_kernel(x_ptr, seq_ptr, n_channels, height, width, stride_b, stride_c, stride_h, stride_w,
                      MERGE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                      MIRROR: tl.constexpr = False):
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
            if MIRROR:
                # The mirrored routes written in ascending order: pixel (H-1-h, W-1-w) sits at
                # position h*W+w of route 2 and w*H+h of route 3, so read x there instead.
                mirrored = tl.load(x_ptr + batch * stride_b + c3 * stride_c + (height - 1 - h3) * stride_h
                                   + (width - 1 - w3) * stride_w, mask=mask, other=0.0)
                tl.store(seq_ptr + plane + 2 * step + row_major, mirrored, mask=mask)
                tl.store(seq_ptr + plane + 3 * step + col_major, mirrored, mask=mask)
            else:
                tl.store(seq_ptr + plane + 2 * step + (length - 1 - row_major), value, mask=mask)
                tl.store(seq_ptr + plane + 3 * step + (length - 1 - col_major), value, mask=mask)


# (BLOCK_C, BLOCK_H = BLOCK_W, num_warps) per direction, the fastest measured on an H200 for a
# channels-last VMamba-T stage-0 map (docs/kernels-gpu.md): narrow channel blocks, wide pixel tiles.
_CROSS_SCAN_LAUNCH = (4, 32, 4)
_CROSS_MERGE_LAUNCH = (8, 16, 4)


def _cross_launch(x, seq, merge, block_c=None, block_hw=None, mirror=True, num_warps=None):
    batch, channels, height, width = x.shape
    default_c, default_hw, default_warps = _CROSS_MERGE_LAUNCH if merge else _CROSS_SCAN_LAUNCH
    block_c = min(block_c or default_c, _next_power_of_2(channels))
    block_h = min(block_hw or default_hw, _next_power_of_2(height))
    block_w = min(block_hw or default_hw, _next_power_of_2(width))
    grid = (batch * _cdiv(channels, block_c), _cdiv(height, block_h) * _cdiv(width, block_w))
    _cross_kernel[grid](x, seq, channels, height, width, *x.stride(),
                        MERGE=merge, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
                        MIRROR=bool(mirror and not merge), num_warps=num_warps or default_warps)


def _scan_layout(x, **launch):
    b, d, h, w = x.shape
    seq = torch.empty(b, 4, d, h * w, dtype=x.dtype, device=x.device)
    _cross_launch(x, seq, merge=False, **launch)
    return seq


def _merge_layout(seq, height, width, **launch):
    """(B, 4, D, L) -> (B, D, H, W) with channels-last strides (what a channel LayerNorm reads best)."""
    b, _, d, _ = seq.shape
    out = torch.empty(b, d, height, width, dtype=seq.dtype, device=seq.device, memory_format=torch.channels_last)
    _cross_launch(out, seq.contiguous(), merge=True, **launch)
    return out


class _CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[2:]
        return _scan_layout(x)

    @staticmethod
    def backward(ctx, grad):
        return _merge_layout(grad, *ctx.hw)


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys):
        b, k, d, height, width = ys.shape
        ctx.shape = ys.shape
        return _merge_layout(ys.reshape(b, k, d, height * width), height, width)

    @staticmethod
    def backward(ctx, grad):
        return _scan_layout(grad).view(ctx.shape)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W) in the four SS2D scan orders."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, D, H, W), got {tuple(x.shape)}")
    return _CrossScan.apply(x)


def cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """(B, 4, D, H, W) -> (B, D, H, W): the four directions read back at each pixel and summed."""
    if ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, D, H, W), got {tuple(ys.shape)}")
    return _CrossMerge.apply(ys)


# ----------------------------------------------------------------------------------------------
# The SS2D core with the scan reading the map: no (B, 4, D, L) cross-scan copies
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _route_kernel(map_ptr, seq_ptr, channels, height, width, s_b, s_c, s_h, s_w,
                      TO_MAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """seq[b, k, c, s] = map[b, k*C + c, pixel at step s of route k]: each route's own channel
        slice laid out along that route (TO_MAP: the inverse permutation, for the gradient).

        One program = one (batch, route) pair and BLOCK_L steps of all C channels.
        """
        pid = tl.program_id(0)
        batch = pid // 4
        route = pid % 4
        length = height * width
        steps = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_c = tl.arange(0, BLOCK_C)
        mask = (offs_c < channels)[:, None] & (steps < length)[None, :]
        map_offs = (batch.to(tl.int64) * s_b + (route * channels + offs_c).to(tl.int64)[:, None] * s_c
                    + _route_offsets(steps, route, height, width, s_h, s_w)[None, :])
        seq_offs = (pid.to(tl.int64) * channels + offs_c)[:, None] * length + steps[None, :]
        if TO_MAP:
            tl.store(map_ptr + map_offs, tl.load(seq_ptr + seq_offs, mask=mask), mask=mask)
        else:
            tl.store(seq_ptr + seq_offs, tl.load(map_ptr + map_offs, mask=mask), mask=mask)


def _route_launch(proj, seq, to_map):
    batch, height, width, routed = proj.shape
    channels = routed // 4
    block_c = _next_power_of_2(channels)
    block_l = max(32, min(256, 4096 // block_c))
    s_b, s_h, s_w, s_c = proj.stride()
    grid = (batch * 4, _cdiv(height * width, block_l))
    _route_kernel[grid](proj, seq, channels, height, width, s_b, s_c, s_h, s_w,
                        TO_MAP=to_map, BLOCK_C=block_c, BLOCK_L=block_l, num_warps=4)


class _RouteProjections(torch.autograd.Function):
    """(B, H, W, 4*C) per-pixel projections -> (B, 4, C, L): slice k along route k."""

    @staticmethod
    def forward(ctx, proj):
        batch, height, width, routed = proj.shape
        ctx.hw = (height, width)
        seq = torch.empty(batch, 4, routed // 4, height * width, dtype=proj.dtype, device=proj.device)
        _route_launch(proj, seq, to_map=False)
        return seq

    @staticmethod
    def backward(ctx, grad):
        batch, _, channels, _ = grad.shape
        height, width = ctx.hw
        dproj = torch.empty(batch, height, width, 4 * channels, dtype=grad.dtype, device=grad.device)
        _route_launch(dproj, grad.contiguous(), to_map=True)
        return dproj


class _TritonCrossScanMerge(torch.autograd.Function):
    """cross_merge(selective_scan(cross_scan(x), ...)) with the scan reading x along each route.

    The forward builds no (B, 4, D, L) copies of x; y is merged by the cross-merge kernel. The
    backward either reads x and the merged output's gradient the same way (backward_reads_map) or
    runs the plain kernel on sequence-ordered copies of both; du is merged like y.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, delta_bias, cfg, backward_reads_map):
        store_states = any(ctx.needs_input_grad[:7])
        y, tile_state = _scan_forward(x, delta, A, B, C, D, delta_bias, True, torch.float32, cfg, store_states)
        ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, tile_state)
        ctx.cfg, ctx.backward_reads_map = cfg, backward_reads_map
        batch, d_inner, height, width = x.shape
        return _merge_layout(y.view(batch, 4, d_inner, height * width), height, width)

    @staticmethod
    def backward(ctx, dout):
        x, delta, A, B, C, D, delta_bias, tile_state = ctx.saved_tensors
        batch, d_inner, height, width = x.shape
        u = x
        if not ctx.backward_reads_map:
            # Sequence-ordered copies of x and of the gradient for the plain backward kernel.
            u = _scan_layout(x).view(batch, 4 * d_inner, height * width)
            dout = _scan_layout(dout).view(batch, 4 * d_inner, height * width)
        du, ddelta, dA, dB, dC, dD, dbias = _scan_backward(
            u, delta, A, B, C, D, delta_bias, tile_state, dout, True, ctx.cfg)
        dx = _merge_layout(du.view(batch, 4, d_inner, height * width), height, width)
        return dx, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias, None, None


# Which SS2D core runs (docs/kernels-gpu.md has the measurements behind the defaults): the fused
# one, whose backward works on sequence-ordered copies of x and of the gradient. Its backward
# reading the map instead (BACKWARD_READS_MAP) ran at half the kernel speed on the H200 and cost
# more host time per training step; FUSED_TRAINING = False or FUSED_CROSS_SCAN = False give the
# composed ops (cross-scan copies, batched projections) with a backward or throughout.
FUSED_CROSS_SCAN = True
FUSED_TRAINING = True
BACKWARD_READS_MAP = False
# Inference through the fused core (one chunk): the scan kernel forms delta = dt_projs_weight @ dts
# itself from the routed projections and reads B and C from them in place, instead of a batched
# matmul writing the (B, 4*Di, L) delta tensor that the kernel then reads back.
FUSED_DT_PROJ = True


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, **launch):
    """The SS2D core (spec §3.7 + §5) for CUDA tensors; the fused form builds no cross-scan copies.

    Fused (d_state = 1; with a backward only if FUSED_TRAINING): the x projection runs once per pixel on
    the map (one GEMM for the four routes' weights) and only its small output, R + 2 values per
    route, is laid out along the routes; the scan reads x itself along each route (see
    _io_offsets) and its output is merged by the cross-merge kernel. Otherwise the composed ops run.
    ``launch`` (chunk_size, block_d, block_t, num_warps) overrides the fused scan's launch heuristic.
    """
    from . import compose_cross_selective_scan

    routes, rank_and_state, d_inner = x_proj_weight.shape
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds))
    if not FUSED_CROSS_SCAN or (training and not FUSED_TRAINING) or A_logs.shape[1] != 1 or routes != 4:
        return compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                            backend="triton")
    batch, _, height, width = x.shape
    length = height * width
    rank = dt_projs_weight.shape[2]
    proj = torch.nn.functional.linear(x.permute(0, 2, 3, 1),
                                      x_proj_weight.reshape(routes * rank_and_state, d_inner).to(x.dtype))
    dts, Bs, Cs = torch.split(_RouteProjections.apply(proj), [rank, 1, 1], dim=2)
    cfg = choose_scan_config(batch, routes, d_inner, 1, length, x.device, training=training, map_io=True,
                             **launch)
    A = -torch.exp(A_logs.float())
    D, delta_bias = Ds.float().contiguous(), dt_projs_bias.reshape(-1).float().contiguous()
    if FUSED_DT_PROJ and not training and cfg.n_chunks == 1:
        y, _ = _scan_forward(x, dts, A, Bs, Cs, D, delta_bias, True, torch.float32, cfg, False,
                             dt_proj=dt_projs_weight.reshape(routes * d_inner, rank).float().contiguous())
        return _merge_layout(y.view(batch, routes, d_inner, length), height, width)
    delta = torch.matmul(dt_projs_weight.to(dts.dtype), dts)                  # (B, 4, Di, L)
    if training and not BACKWARD_READS_MAP:
        # The backward runs the plain kernel on sequence-ordered copies: its launch, same tiles.
        plain = choose_scan_config(batch, routes, d_inner, 1, length, x.device, training=True, **launch)
        cfg = cfg._replace(bwd_block_d=plain.bwd_block_d, bwd_num_warps=plain.bwd_num_warps,
                           bwd_maxnreg=plain.bwd_maxnreg)
    # B and C stay views of the routed projections: the N = 1 kernels take their row stride.
    return _TritonCrossScanMerge.apply(x, delta.view(batch, routes * d_inner, length), A, Bs, Cs, D, delta_bias,
                                       cfg, BACKWARD_READS_MAP)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (CI proof that every kernel builds for real GPUs, no GPU needed)
# ----------------------------------------------------------------------------------------------

# Pointer arguments that carry the caller's activation dtype; every other pointer is float32.
_IO_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "du_ptr", "ddelta_ptr", "x_ptr", "seq_ptr",
                "y_ptr", "dy_ptr", "dx_ptr", "map_ptr"}


def kernel_variants(d_states=(1, 16)):
    """(label, kernel, constexprs, num_warps) for every kernel at VMamba-like block sizes."""
    variants = []
    flags = dict(HAS_BIAS=True, SOFTPLUS=True)
    for d_state in d_states:
        # VMamba-T stage 0 (K=4, 96 channels per direction) for N = 1; v0 (N = 16) at 192 channels.
        cfg = choose_scan_config(128, 4, 96 if d_state == 1 else 192, d_state, 3136, sm_count=132, training=True)
        block_d, block_n, block_t, num_warps = cfg.block_d, cfg.block_n, cfg.block_t, cfg.num_warps
        blocks = dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t)
        full = dict(HAS_D=True, HAS_INIT=True, **flags)
        # N = 1 kernels also read u (and dy) from the map in the fused SS2D core.
        for map_io in ((False, True) if d_state == 1 else (False,)):
            tag = ",map" if map_io else ""
            variants += [
                (f"chunk_state[N={d_state}{tag}]", _scan_chunk_state_kernel, dict(**flags, **blocks, MAP_IO=map_io),
                 num_warps),
                (f"bwd_chunk[N={d_state}{tag}]", _scan_bwd_chunk_kernel, dict(**flags, **blocks, MAP_IO=map_io),
                 num_warps),
            ]
            if d_state == 1:
                for prefetch in (False, True):
                    blocks_2d = dict(BLOCK_D=block_d, BLOCK_T=block_t, MAP_IO=map_io, PREFETCH=prefetch)
                    label = tag + (",prefetch" if prefetch else "")
                    variants += [
                        (f"scan_fwd[N=1{label}]", _scan_fwd_n1_kernel,
                         dict(**full, STORE_STATES=True, **blocks_2d, DT_PROJ=False), num_warps),
                        (f"scan_bwd[N=1{label}]", _scan_bwd_n1_kernel,
                         dict(**full, **blocks_2d, BC_PARTIALS=prefetch), num_warps),
                    ]
                    if map_io:
                        # The inference forward of the fused core: delta formed in the kernel.
                        variants.append((f"scan_fwd[N=1{label},dt_proj]", _scan_fwd_n1_kernel,
                                         dict(**flags, HAS_D=True, HAS_INIT=False, STORE_STATES=False,
                                              **blocks_2d, DT_PROJ=True), num_warps))
        if d_state != 1:
            variants += [
                (f"scan_fwd[N={d_state}]", _scan_fwd_kernel, dict(**full, STORE_STATES=True, **blocks), num_warps),
                (f"scan_bwd[N={d_state}]", _scan_bwd_kernel, dict(**full, **blocks), num_warps),
            ]
        for reverse in (False, True):
            variants.append((f"chunk_carry[N={d_state},reverse={reverse}]", _chunk_carry_kernel,
                             dict(REVERSE=reverse, BLOCK_R=max(1, min(128, 2048 // block_n)), BLOCK_N=block_n), 4))
    from .layernorm_triton import _ln_bwd_kernel, _ln_fwd_kernel

    variants += [("ln_fwd", _ln_fwd_kernel, dict(BLOCK_R=32, BLOCK_C=128), 4),
                 ("ln_bwd", _ln_bwd_kernel, dict(BLOCK_R=32, BLOCK_C=128), 4)]
    for to_map in (False, True):
        variants.append((f"route[to_map={to_map}]", _route_kernel, dict(TO_MAP=to_map, BLOCK_C=8, BLOCK_L=256), 4))
    for merge in (False, True):
        variants.append((f"cross[merge={merge}]", _cross_kernel,
                         dict(MERGE=merge, BLOCK_C=_CROSS_SCAN_LAUNCH[0], BLOCK_H=_CROSS_SCAN_LAUNCH[1],
                              BLOCK_W=_CROSS_SCAN_LAUNCH[1], MIRROR=not merge), 4))
    return variants


def compile_kernels(capability: int, io_dtypes=("fp32", "bf16"), d_states=(1, 16)) -> dict:
    """Compile every kernel for ``GPUTarget("cuda", capability, 32)``; works on a machine without GPU.

    Must run with the interpreter off (kernels are then JITFunctions). Returns
    ``{"<kernel>[...]/<io dtype>": {"cubin_bytes": int, "shared": int}}``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _INTERPRET:
        raise RuntimeError("compile_kernels needs TRITON_INTERPRET unset (the interpreter replaces the kernels)")
    target = GPUTarget("cuda", capability, 32)
    results = {}
    for label, kernel, constexprs, num_warps in kernel_variants(d_states):
        uses_io = any(p.name in _IO_POINTERS for p in kernel.params)
        for io in (io_dtypes if uses_io else ("fp32",)):
            signature = {}
            for p in kernel.params:
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                elif p.name.endswith("_ptr"):
                    signature[p.name] = f"*{io}" if p.name in _IO_POINTERS else "*fp32"
                elif p.name == "eps":
                    signature[p.name] = "fp32"
                else:
                    signature[p.name] = "i32"
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                      options={"num_warps": num_warps})
            results[f"{label}/{io}"] = {"cubin_bytes": len(compiled.asm["cubin"]),
                                        "shared": compiled.metadata.shared}
    return results
