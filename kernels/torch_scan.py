"""The PyTorch path (backend "torch"): a blocked two-level selective scan, and cross-scan / merge
with flips and transposes.

The scan computes what ``reference.selective_scan_reference`` computes (docs/design.md §5.2), but
the recurrence is split into chunks that are scanned in lock-step (a short Python loop vectorised
over every chunk of every channel), a second short loop carries the state across chunks, and the
backward is written out by hand (docs/design.md §5.3) so that no per-step autograd graph is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import check_scan_shapes, empty_scan
from .reference import step_size as _step_size

__all__ = ["selective_scan_blocked", "linear_recurrence", "cross_scan_torch", "cross_merge_torch"]

# Elements of one (batch, channel-block, N, L) working tensor; larger inputs are processed in
# channel blocks so that the (B, KD, N, L) temporaries stay a few hundred MB at most.
MAX_BLOCK_ELEMENTS = 1 << 24


def _group_index(channels: int, groups: int, device) -> torch.Tensor:
    """Group (direction) of every channel: channel c belongs to group c // (channels / groups)."""
    return torch.arange(channels, device=device) // (channels // groups)


# --------------------------------------------------------------------------------------------
# Blocked linear recurrence
# --------------------------------------------------------------------------------------------

def linear_recurrence(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along the last axis with h_{-1} = 0 (h_t = a_t*h_{t+1} + b_t if reverse).

    Two-level blocked scan: the sequence is cut into ~sqrt(L) chunks of ~sqrt(L) steps; every chunk
    is scanned from a zero state in lock-step, then the chunk-end states are chained, then each
    chunk is corrected by (cumulative decay) * (incoming state). About 2*sqrt(L) vectorised steps.
    Only products of decays are formed (never divisions), so it is as stable as the plain loop.
    """
    if reverse:
        return linear_recurrence(a.flip(-1), b.flip(-1)).flip(-1)
    length = a.shape[-1]
    chunk = max(4, math.isqrt(max(length - 1, 0)) + 1)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad), value=0.0)
    lead = a.shape[:-1]
    # Step axis first, so that each lock-step update touches one contiguous slab.
    a_steps = a.reshape(*lead, n_chunks, chunk).movedim(-1, 0).contiguous()
    b_steps = b.reshape(*lead, n_chunks, chunk).movedim(-1, 0)
    local = torch.empty_like(a_steps)
    local[0] = b_steps[0]
    for t in range(1, chunk):
        torch.addcmul(b_steps[t], a_steps[t], local[t - 1], out=local[t])
    decay = torch.cumprod(a_steps, dim=0)
    # Chain chunk-end states: incoming[c] = state entering chunk c.
    end_state, end_decay = local[-1], decay[-1]
    incoming = torch.empty_like(end_state)
    carry = torch.zeros_like(end_state[..., 0])
    for c in range(n_chunks):
        incoming[..., c] = carry
        carry = torch.addcmul(end_state[..., c], end_decay[..., c], carry)
    h = torch.addcmul(local, decay, incoming)
    return h.movedim(0, -1).reshape(*lead, n_chunks * chunk)[..., :length]


def _channel_blocks(batch, channels, d_state, length, max_elements=MAX_BLOCK_ELEMENTS):
    per_channel = max(1, batch * d_state * length)
    step = max(1, min(channels, max_elements // per_channel))
    return [(s, min(s + step, channels)) for s in range(0, channels, step)]


def _forward_block(u, dt, A, Bc, Cc):
    """States and outputs for one channel block (all float32). Returns (y_without_D, h, decay)."""
    decay = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    drive = (dt * u)[:, :, None, :] * Bc
    h = linear_recurrence(decay, drive)
    return (h * Cc).sum(2), h, decay


class _BlockedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype, max_elements):
        groups = B.shape[1]
        batch, channels, length = u.shape
        uf, dt = u.float(), _step_size(delta, delta_bias, delta_softplus)
        Af, Bf, Cf = A.float(), B.float(), C.float()
        y = torch.empty(batch, channels, length, dtype=torch.float32, device=u.device)
        group_of = _group_index(channels, groups, u.device)
        for lo, hi in _channel_blocks(batch, channels, A.shape[1], length, max_elements):
            Bc, Cc = Bf.index_select(1, group_of[lo:hi]), Cf.index_select(1, group_of[lo:hi])
            y[:, lo:hi] = _forward_block(uf[:, lo:hi], dt[:, lo:hi], Af[lo:hi], Bc, Cc)[0]
        if D is not None:
            y += D.float()[:, None] * uf
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.groups, ctx.max_elements = groups, max_elements
        return y.to(output_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        batch, channels, length = u.shape
        g = grad_y.float()
        uf, Af, Bf, Cf = u.float(), A.float(), B.float(), C.float()
        pre = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[:, None]
        dt = F.softplus(pre) if ctx.delta_softplus else pre

        du = torch.empty_like(uf)
        d_dt = torch.empty_like(uf)
        dA = torch.empty_like(Af)
        dB = torch.zeros_like(Bf)
        dC = torch.zeros_like(Cf)
        group_of = _group_index(channels, ctx.groups, u.device)
        for lo, hi in _channel_blocks(batch, channels, A.shape[1], length, ctx.max_elements):
            groups_b = group_of[lo:hi]
            Bc, Cc = Bf.index_select(1, groups_b), Cf.index_select(1, groups_b)
            u_b, dt_b, g_b = uf[:, lo:hi], dt[:, lo:hi], g[:, lo:hi]
            _, h, decay = _forward_block(u_b, dt_b, Af[lo:hi], Bc, Cc)
            # dh_t = g_t C_t + decay_{t+1} dh_{t+1}
            next_decay = F.pad(decay[..., 1:], (0, 1), value=1.0)
            dh = linear_recurrence(next_decay, g_b[:, :, None, :] * Cc, reverse=True)
            h_prev = F.pad(h[..., :-1], (1, 0))
            through_decay = dh * h_prev * decay
            dA[lo:hi] = (through_decay * dt_b[:, :, None, :]).sum((0, 3))
            dh_B = (dh * Bc).sum(2)
            du[:, lo:hi] = dh_B * dt_b
            d_dt[:, lo:hi] = (through_decay * Af[lo:hi][None, :, :, None]).sum(2) + dh_B * u_b
            # B and C are shared by a group's channels: sum their per-channel grads into the group.
            dB.index_add_(1, groups_b, dh * (dt_b * u_b)[:, :, None, :])
            dC.index_add_(1, groups_b, g_b[:, :, None, :] * h)
        if D is not None:
            du += D.float()[:, None] * g
            dD = (g * uf).sum((0, 2))
        else:
            dD = None
        if ctx.delta_softplus:
            d_pre = d_dt * torch.where(pre > 20.0, torch.ones_like(pre), torch.sigmoid(pre))
        else:
            d_pre = d_dt
        d_bias = d_pre.sum((0, 2)) if delta_bias is not None else None
        return (du.to(u.dtype), d_pre.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if dD is None else dD.to(D.dtype),
                None if d_bias is None else d_bias.to(delta_bias.dtype), None, None, None)


def selective_scan_blocked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                           output_dtype=torch.float32, max_block_elements=MAX_BLOCK_ELEMENTS):
    """Blocked two-level selective scan with a hand-written backward (float32 state).

    ``max_block_elements`` bounds the (batch, channel block, N, L) working tensors: channels are
    processed in blocks of at most that many elements.
    """
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return empty_scan(u, delta, A, B, C, D, delta_bias, output_dtype)
    return _BlockedSelectiveScan.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), output_dtype,
                                       max_block_elements)


# --------------------------------------------------------------------------------------------
# Cross-scan / cross-merge
# --------------------------------------------------------------------------------------------

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
