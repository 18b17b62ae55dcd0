"""Triton selective scan for any state size N: tiles of [BLOCK_D, N, BLOCK_T], chunked along L.

One program = one batch element, one block of channels inside one group, one chunk of L
(docs/design.md §5.4):

* The sequence is walked in tiles of BLOCK_T steps: u, delta, B, C are loaded as
  ``[BLOCK_D, BLOCK_T]`` tiles (each channel's L is contiguous, so loads and stores coalesce),
  softplus, the decays ``exp(dt*A)`` and the drives ``dt*u*B`` are formed tile-wide, and the
  recurrence ``h_t = decay_t * h_{t-1} + drive_t`` over the tile is one ``tl.associative_scan`` of
  (decay, drive) pairs (composition of affine maps), plus the decayed state entering the tile. y is
  ``sum_n h * C + D*u``, one coalesced store per tile; the state leaving the tile is its last
  column. The loop over tiles is a runtime loop, so compile time does not grow with L.
* Long sequences are cut into chunks so that batch 1 at L = 65,536 still fills the GPU: a state pass
  (``_scan_chunk_state_kernel``) scans every chunk from zero and emits its end state and
  ``sum(dt)`` (the chunk's decay is ``exp(A * sum(dt))``), a tiny carry pass chains the chunks, and
  the output pass rescans each chunk from its true incoming state (FLA ``hgrn/chunk`` style). The
  chunk passes serve the N = 1 kernels (``scan_n1.py``) too.
* No per-step states: when a backward can follow, the forward keeps the state entering each tile.
  The backward walks the tiles right to left: it rebuilds the tile's states from that entry state
  with one forward scan, gets ``dh_t = g_t C_t + exp(dt_{t+1} A) dh_{t+1}`` from one reverse
  associative scan (the decay of step t+1 re-read from delta one step along), and takes
  ``exp(dt_t A) h_{t-1}`` as ``h_t - drive_t``, so every other gradient is element-wise. du and
  ddelta are stored tile-wise; dB and dC are reduced over the tile's channels and added atomically
  (several channel blocks share a group); dA, dD and ddelta_bias are per-program partials summed by
  torch afterwards.
"""

from __future__ import annotations

from .common import tl, triton

if triton is not None:
    # @triton.jit helpers shared by the scan kernels (resolved from this module when compiling).
    from .common import _compose, _io_offsets, _per_channel, _program_coords, _step_size, _steps

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
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Backward pass 1 (long sequences only): reverse dh recurrence of each chunk from zero.

        Emits exp(dt_s*A) * dh_s at the chunk's first step s (what the chunk hands to its left
        neighbour) and sum(dt) over the chunk.
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
        for i in range(0, n_tiles):
            t = start + (n_tiles - 1 - i) * BLOCK_T + offs_t
            mask = mask_d[:, None] & (t < stop)[None, :]
            pre = tl.load(delta_ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32) + bias[:, None]
            dt = tl.where(mask, _step_size(pre, SOFTPLUS), 0.0)
            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            next_decay = _next_decay(delta_ptr, bias, A, row, t, mask_d, stop, SOFTPLUS)
            g = tl.load(dy_ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(tl.float32)
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
        """Backward output pass for one chunk, tiles right to left: every gradient of docs/design.md §5.3.

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
