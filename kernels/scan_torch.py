"""Selective scan in plain PyTorch: the sequential reference and a blocked two-level form.

Both compute, per batch b, channel c (direction group k = c // (KD / G)) and state n::

    dt_t   = softplus(delta[b, c, t] + delta_bias[c])          (softplus optional)
    h_t    = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B[b, k, n, t] * u[b, c, t],   h_{-1} = 0
    y_t    = sum_n C[b, k, n, t] * h_t + D[c] * u[b, c, t]

``selective_scan_reference`` is the oracle: one step at a time under autograd, float32 throughout.
``selective_scan_blocked`` is the fast portable path: the recurrence is split into chunks that are
scanned in lock-step (a short Python loop vectorised over every chunk of every channel), a second
short loop carries the state across chunks, and the backward is written out by hand (spec §5.3)
so that no per-step autograd graph is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one (batch, channel-block, N, L) working tensor; larger inputs are processed in
# channel blocks so that the (B, KD, N, L) temporaries stay a few hundred MB at most.
_MAX_BLOCK_ELEMENTS = 1 << 24


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
    if C.shape[1] != groups or channels % groups:
        raise ValueError(f"B and C need the same group count dividing {channels}, got {B.shape[1]}, {C.shape[1]}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (channels,):
            raise ValueError(f"{name} must be ({channels},), got {tuple(v.shape)}")
    return groups


def _per_channel(m: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G, N, L) group matrix -> (B, channels, N, L), each group repeated for its channels."""
    b, g, n, l = m.shape
    return m[:, :, None].expand(b, g, channels // g, n, l).reshape(b, channels, n, l)


def _group_index(channels: int, groups: int, device) -> torch.Tensor:
    """Group (direction) of every channel: channel c belongs to group c // (channels / groups)."""
    return torch.arange(channels, device=device) // (channels // groups)


def _step_size(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


# --------------------------------------------------------------------------------------------
# Sequential reference (test oracle)
# --------------------------------------------------------------------------------------------

def selective_scan_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                             output_dtype=torch.float32):
    """Step-by-step selective scan; differentiable through autograd. Slow: use it as the oracle."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    channels, length = u.shape[1], u.shape[2]
    uf = u.float()
    dt = _step_size(delta, delta_bias, delta_softplus)
    Bc = _per_channel(B.float(), channels)
    Cc = _per_channel(C.float(), channels)
    Af = A.float()
    h = uf.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * uf
    return y.to(output_dtype)


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


def _channel_blocks(batch, channels, d_state, length):
    per_channel = max(1, batch * d_state * length)
    step = max(1, min(channels, _MAX_BLOCK_ELEMENTS // per_channel))
    return [(s, min(s + step, channels)) for s in range(0, channels, step)]


def _forward_block(u, dt, A, Bc, Cc):
    """States and outputs for one channel block (all float32). Returns (y_without_D, h, decay)."""
    decay = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    drive = (dt * u)[:, :, None, :] * Bc
    h = linear_recurrence(decay, drive)
    return (h * Cc).sum(2), h, decay


class _BlockedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype):
        groups = B.shape[1]
        batch, channels, length = u.shape
        uf, dt = u.float(), _step_size(delta, delta_bias, delta_softplus)
        Af, Bf, Cf = A.float(), B.float(), C.float()
        y = torch.empty(batch, channels, length, dtype=torch.float32, device=u.device)
        group_of = _group_index(channels, groups, u.device)
        for lo, hi in _channel_blocks(batch, channels, A.shape[1], length):
            Bc, Cc = Bf.index_select(1, group_of[lo:hi]), Cf.index_select(1, group_of[lo:hi])
            y[:, lo:hi] = _forward_block(uf[:, lo:hi], dt[:, lo:hi], Af[lo:hi], Bc, Cc)[0]
        if D is not None:
            y += D.float()[:, None] * uf
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.groups = groups
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
        for lo, hi in _channel_blocks(batch, channels, A.shape[1], length):
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
                None if d_bias is None else d_bias.to(delta_bias.dtype), None, None)


def selective_scan_blocked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                           output_dtype=torch.float32):
    """Blocked two-level selective scan with a hand-written backward (float32 state)."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    return _BlockedSelectiveScan.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), output_dtype)
