"""Selective scan as a fixed graph of standard tensor ops: the chunked closed form of the recurrence.

The scan (docs/design.md §5.2) is the linear recurrence, per (batch, channel, state)::

    h_t = exp(a_t) * h_{t-1} + x_t,   a_t = dt_t * A <= 0,   x_t = dt_t * B_t * u_t,   h_{-1} = 0

whose solution is ``h_t = sum_{s <= t} exp(a_{s+1} + ... + a_t) * x_s``. This module evaluates it
without a loop over the sequence and without data-dependent shapes, so that exporters (ONNX,
torch.export) see one graph whose size does not depend on the image size:

* level 1: the sequence is cut into chunks of ``CHUNK`` steps; inside a chunk the state is the
  masked (CHUNK x CHUNK) decay matrix times the drives;
* levels 2 .. LEVELS-1: the chunk-end states obey the same recurrence over chunks (log-decay = the
  chunk's sum of a_t), solved by the same chunked closed form one level up;
* top level: the all-pairs closed form over what is left (``ceil(L / CHUNK**(LEVELS-1))`` entries,
  e.g. 7 for a 224 input's first stage, 128 for a 1024x1024 input's).

Numerics: only sums of non-positive log-decays are exponentiated, so nothing overflows. Each
``a_{s+1} + ... + a_t`` is formed as a cumulative sum of the masked terms themselves (not as a
difference of two long running sums, which would lose digits once the sums grow), and entries
with s > t are set to -inf before ``exp`` so that they give exact zeros (no inf * 0 = NaN, and a
zero gradient). Padding steps added to reach a multiple of the chunk have a = 0 and x = 0: the
state passes through them unchanged and their outputs are dropped.

Cost and the choice of CHUNK: the decay matrices hold ``batch * K*D * N * L * CHUNK`` floats
(CHUNK times the state itself, and about CHUNK exps per step instead of one), the upper levels add
about ``L / CHUNK`` per (batch, channel, state) and the top level ``(L / CHUNK**(LEVELS-1))**2``. A
smaller chunk means less memory and work at the first level and more levels; 8 with 4 levels keeps
the first level at 8x the state and the top table negligible up to L = 65536 (a 1024 input's first
stage). For vmamba-tiny at 224, batch 8, the largest decay tensor is 8*384*3136*8 floats (308 MB).
Backward is plain autograd through these ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import check_scan_shapes, empty_scan
from .reference import step_size as _step_size

CHUNK = 8
LEVELS = 4

__all__ = ["selective_scan", "selective_scan_chunked", "chunked_selective_scan_op", "linear_recurrence_closed",
           "is_available", "CHUNK", "LEVELS"]


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """(..., T) log-decays -> (..., T, T) with [t, s] = a_{s+1} + ... + a_t for s <= t, -inf above.

    Built as a cumulative sum down the columns of the strictly-lower-masked repeat of ``a``, so each
    entry only sums the terms it needs. The masks are a multiplication by 0/1 and an addition of
    0/-inf (entries above the diagonal sum to exactly 0, so they become -inf, never NaN).
    """
    steps = a.shape[-1]
    idx = torch.arange(steps, device=a.device)
    strictly_lower = (idx[:, None] > idx[None, :]).to(a.dtype)          # [t, s]: t > s
    upper_bias = torch.zeros(steps, steps, dtype=a.dtype, device=a.device).masked_fill(
        idx[:, None] < idx[None, :], float("-inf"))
    sums = torch.cumsum(a.unsqueeze(-1) * strictly_lower, dim=-2)
    return sums + upper_bias


def _all_pairs(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = sum_{s <= t} exp(a_{s+1} + ... + a_t) x_s over the whole last axis at once."""
    decay = torch.exp(_segment_sums(a))                    # (..., T, T)
    return torch.matmul(decay, x.unsqueeze(-1)).squeeze(-1)


def linear_recurrence_closed(a: torch.Tensor, x: torch.Tensor, chunk: int = CHUNK, levels: int = LEVELS) -> torch.Tensor:
    """h_t = exp(a_t) h_{t-1} + x_t along the last axis (h_{-1} = 0), for log-decays a <= 0.

    ``levels`` - 1 chunked levels of ``chunk`` steps, then the all-pairs closed form on what is left.
    """
    if levels <= 1:
        return _all_pairs(a, x)
    length = a.shape[-1]
    pad = (chunk - length % chunk) % chunk
    a = F.pad(a, (0, pad))                                  # a = 0: decay 1, state unchanged
    x = F.pad(x, (0, pad))
    lead = a.shape[:-1]
    a_c = a.reshape(*lead, -1, chunk)                       # (..., M, T)
    x_c = x.reshape(*lead, -1, chunk)
    local = _all_pairs(a_c, x_c)                            # states from a zero start in each chunk
    # Chunk j carries its end state forward with decay exp(sum of its a): the same recurrence, one
    # level up. carried[j] is the state after chunk j; chunk j starts from carried[j - 1].
    carried = linear_recurrence_closed(a_c.sum(-1), local[..., -1], chunk, levels - 1)
    incoming = F.pad(carried, (1, 0))[..., :-1]
    h = local + torch.exp(torch.cumsum(a_c, dim=-1)) * incoming.unsqueeze(-1)
    return h.reshape(*lead, -1)[..., :length]


def selective_scan_chunked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                           output_dtype=torch.float32, chunk: int = CHUNK):
    """Selective scan (docs/design.md §5.1 shapes) from standard ops; float32; autograd backward."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    uf = u.float()
    dt = _step_size(delta, delta_bias, delta_softplus)      # (B, KD, L)
    a = dt.unsqueeze(2) * A.float().unsqueeze(-1)           # (B, KD, N, L), <= 0 for A <= 0
    # Each group's B (and C) is shared by its channels: broadcast over a (group, channel) split.
    drive = (dt * uf).reshape(batch, groups, per_group, 1, length) * B.float().unsqueeze(2)
    h = linear_recurrence_closed(a, drive.reshape(batch, channels, d_state, length), chunk)
    y = (h.reshape(batch, groups, per_group, d_state, length) * C.float().unsqueeze(2)).sum(3)
    y = y.reshape(batch, channels, length)
    if D is not None:
        y = y + D.float()[:, None] * uf
    return y.to(output_dtype)


# ------------------------------------------------------------------------------------------------
# The backend: one registered operator around the composite
# ------------------------------------------------------------------------------------------------
# Traced as it stands, the composite's padding and chunk reshapes put modular arithmetic on the
# symbolic sequence length into the trace, and the tracer then specialises on the example's sizes
# (for instance "the number of chunks is not 1"). As one operator with a shape-only fake, the scan is
# a single node for torch.export; the ONNX exporter lowers that node to the same chunked closed form
# in standard ONNX operators, with the sizes computed at run time (vmamba_cli/export.py).

@torch.library.custom_op("vmamba::chunked_selective_scan", mutates_args=())
def chunked_selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                              delta_softplus: bool, chunk: int) -> torch.Tensor:
    return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk=chunk)


@chunked_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk):
    return u.new_empty(u.shape, dtype=torch.float32)


_TENSOR_ARGS = 7


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in inputs[:_TENSOR_ARGS]))
    ctx.present = tuple(t is not None for t in inputs[:_TENSOR_ARGS])
    ctx.delta_softplus, ctx.chunk = inputs[_TENSOR_ARGS], inputs[_TENSOR_ARGS + 1]


def _backward(ctx, grad):
    # Recompute the composite under autograd: its backward is that of plain tensor ops.
    saved = [t.detach().requires_grad_(t.is_floating_point()) if p else None
             for t, p in zip(ctx.saved_tensors, ctx.present)]
    with torch.enable_grad():
        y = selective_scan_chunked(*saved, ctx.delta_softplus, chunk=ctx.chunk)
        wanted = [t for t in saved if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
    return (*(next(grads) if t is not None else None for t in saved), None, None)


chunked_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, output_dtype=torch.float32):
    """Backend entry of vmamba_cli.kernels (backend="chunked"): the registered operator."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return empty_scan(u, delta, A, B, C, D, delta_bias, output_dtype)
    y = chunked_selective_scan_op(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), CHUNK)
    return y.to(output_dtype)


# Only the scan is provided; cross-scan/merge come from the "torch" backend (flips and transposes,
# which trace with symbolic sizes).
def is_available(device: torch.device) -> bool:
    return True
