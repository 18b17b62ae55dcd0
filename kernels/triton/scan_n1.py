"""Triton selective scan for N = 1 (the v2 models): the passes of ``chunked_scan.py`` on
[BLOCK_D, BLOCK_T] tiles, without the state axis.

* The forward (``_scan_fwd_n1_kernel``) reads u either from (B, K*D, L) sequences or (MAP_IO) from
  the (B, D, H, W) map along each group's cross-scan route, so the fused SS2D core never builds
  the four sequence-ordered copies of x. PREFETCH issues the loads of the next tile before the
  current one is computed (the inference launch; the training launch runs without, see
  ``tuning.choose_scan_config``). DT_PROJ forms delta in the kernel from the routed low-rank rows
  (the fused core's inference).
* The backward (``_scan_bwd_n1_kernel``) walks the tiles right to left on sequence-ordered inputs,
  loading the tile to the left (the next one walked) before computing the current one. Each
  channel block writes its dB / dC sums into its own slice of a (blocks, B, K, 1, L) buffer that
  torch sums afterwards: no atomics, so dB and dC come out the same on every run.
"""

from __future__ import annotations

from .common import tl, triton

if triton is not None:
    # @triton.jit helpers shared by the scan kernels (resolved from this module when compiling).
    from .common import _compose, _io_offsets, _per_channel, _program_coords, _step_size, _steps

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
    def _sequence_tile(t, lower, stop, row, mask_d):
        """Masks (steps lower <= t < stop) and sequence offsets of the tile at steps t."""
        mask_t = (t >= lower) & (t < stop)
        mask = mask_d[:, None] & mask_t[None, :]
        return mask_t, mask, row[:, None] + t[None, :]

    @triton.jit
    def _scan_bwd_n1_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, delta_bias_ptr, dy_ptr, dh_in_ptr,
        tile_state_ptr, du_ptr, ddelta_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
        length, chunk_len, n_chunks, n_tiles_total, n_blocks, groups, channels_per_group, bc_block_stride, bc_stride,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Backward output pass for d_state = 1: every gradient of docs/design.md §5.3, one chunk,
        tiles right to left, each tile's loads issued one iteration ahead."""
        (batch, group, channels, mask_d, chunk, start, stop, offs_t, n_channels, A, bias, skip, pair, row,
         bc_row) = _n1_block(A_ptr, D_ptr, delta_bias_ptr, n_blocks, groups, channels_per_group, length, chunk_len,
                             bc_stride, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_T)
        # dB and dC are their own (B, K, 1, L) partial buffers, whatever B's stride.
        bc_out = (batch * groups + group).to(tl.int64) * length
        bc_block = (tl.program_id(0) % n_blocks).to(tl.int64) * bc_block_stride
        first_tile = start // BLOCK_T
        n_tiles = tl.cdiv(stop - start, BLOCK_T)
        if HAS_INIT:
            dh_right = tl.load(dh_in_ptr + pair * n_chunks + chunk, mask=mask_d, other=0.0)
        else:
            dh_right = tl.zeros([BLOCK_D], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        t = start + (n_tiles - 1) * BLOCK_T + offs_t
        mask_t, mask, offs = _sequence_tile(t, start, stop, row, mask_d)
        mask_next = mask_d[:, None] & (t + 1 < stop)[None, :]
        u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead = _load_raw_bwd_n1(
            u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, offs, offs, offs, bc_row, t, mask_t, mask, mask_next)
        for i in range(0, n_tiles):
            tile = n_tiles - 1 - i
            t = start + tile * BLOCK_T + offs_t
            mask_t, mask, offs = _sequence_tile(t, start, stop, row, mask_d)
            mask_next = mask_d[:, None] & (t + 1 < stop)[None, :]
            u_raw, delta_raw, B_raw, C_raw, g_raw, delta_next_raw = (
                u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead)
            t_ahead = t - BLOCK_T
            mask_t_ahead, mask_ahead, offs_ahead = _sequence_tile(t_ahead, start, stop, row, mask_d)
            # The tile to the left ends where this one starts, so its step-along delta is in the chunk.
            u_ahead, delta_ahead, B_ahead, C_ahead, g_ahead, delta_next_ahead = _load_raw_bwd_n1(
                u_ptr, delta_ptr, B_ptr, C_ptr, dy_ptr, offs_ahead, offs_ahead, offs_ahead, bc_row, t_ahead,
                mask_t_ahead, mask_ahead, mask_ahead)
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

            # Sums over the block's channels, into this block's slice of the partial buffers.
            bc_slot = bc_block + bc_out + t
            tl.store(dC_ptr + bc_slot, tl.sum(g * states, axis=0), mask=mask_t)
            tl.store(dB_ptr + bc_slot, tl.sum(dh * dt * u, axis=0), mask=mask_t)
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
