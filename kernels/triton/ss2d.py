"""The fused SS2D core for CUDA tensors (d_state = 1): no (B, 4, D, L) cross-scan copies of x.

The x projection runs once per pixel on the map (one GEMM for the four routes' weights) and only
its small output, R + 2 values per route, is laid out along the routes (``_route_kernel``); the
scan's forward reads x itself along each route (MAP_IO, ``common._io_offsets``) and its output is
merged by the cross-merge kernel. The backward builds sequence-ordered copies of x and of the
gradient and runs the plain N = 1 backward. For one-chunk inference the scan kernel also forms
delta itself (``TritonTuning.fused_dt_proj``). Everything else (N > 1, or the tuning's switches
off) runs the composed ops (``compose.py``) on the Triton cross-scan and scan.
"""

from __future__ import annotations

import functools

import torch

from ..common import check_core_shapes, is_empty_core
from ..compose import compose_ops
from ..torch_scan import cross_merge_torch, cross_scan_torch, selective_scan_blocked
from .autograd import selective_scan
from .common import cdiv, next_power_of_2, tl, triton
from .cross_scan import cross_merge, cross_scan, merge_layout, scan_layout
from .launch import scan_backward, scan_forward
from .tuning import DEFAULT_TUNING, TritonTuning, choose_scan_config

__all__ = ["cross_selective_scan"]


if triton is not None:
    from .common import _route_offsets

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
    block_c = next_power_of_2(channels)
    block_l = max(32, min(256, 4096 // block_c))
    s_b, s_h, s_w, s_c = proj.stride()
    grid = (batch * 4, cdiv(height * width, block_l))
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
    """cross_merge(selective_scan(cross_scan(x), ...)) with the forward scan reading x along each route.

    The forward builds no (B, 4, D, L) copies of x; y is merged by the cross-merge kernel. The
    backward runs the plain kernel on sequence-ordered copies of x and of the merged output's
    gradient; du is merged like y.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, delta_bias, cfg, tuning):
        store_states = any(ctx.needs_input_grad[:7])
        y, tile_state = scan_forward(x, delta, A, B, C, D, delta_bias, True, torch.float32, cfg, store_states)
        ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, tile_state)
        ctx.cfg, ctx.tuning = cfg, tuning
        batch, d_inner, height, width = x.shape
        return merge_layout(y.view(batch, 4, d_inner, height * width), height, width, tuning)

    @staticmethod
    def backward(ctx, dout):
        x, delta, A, B, C, D, delta_bias, tile_state = ctx.saved_tensors
        batch, d_inner, height, width = x.shape
        u = scan_layout(x, ctx.tuning).view(batch, 4 * d_inner, height * width)
        dout = scan_layout(dout, ctx.tuning).view(batch, 4 * d_inner, height * width)
        du, ddelta, dA, dB, dC, dD, dbias = scan_backward(
            u, delta, A, B, C, D, delta_bias, tile_state, dout, True, ctx.cfg)
        dx = merge_layout(du.view(batch, 4, d_inner, height * width), height, width, ctx.tuning)
        return dx, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias, None, None


def _composed(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, tuning):
    return compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                       scan=functools.partial(selective_scan, tuning=tuning),
                       cross_scan=functools.partial(cross_scan, tuning=tuning),
                       cross_merge=functools.partial(cross_merge, tuning=tuning))


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                         tuning: TritonTuning | None = None, **launch):
    """The SS2D core (docs/design.md §3.7 + §5) for CUDA tensors; the fused form builds no cross-scan copies.

    Fused when d_state = 1 and ``tuning.fused_cross_scan`` (with a backward to follow only if
    ``tuning.fused_training``); otherwise the composed ops. ``launch`` (chunk_size, block_d,
    block_t, num_warps) overrides the fused scan's launch heuristic.
    """
    tuning = tuning or DEFAULT_TUNING
    check_core_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if is_empty_core(x):
        return compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                           scan=selective_scan_blocked, cross_scan=cross_scan_torch, cross_merge=cross_merge_torch)
    routes, rank_and_state, d_inner = x_proj_weight.shape
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds))
    if (not tuning.fused_cross_scan or (training and not tuning.fused_training) or A_logs.shape[1] != 1
            or routes != 4):
        return _composed(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, tuning)
    batch, _, height, width = x.shape
    length = height * width
    rank = dt_projs_weight.shape[2]
    proj = torch.nn.functional.linear(x.permute(0, 2, 3, 1),
                                      x_proj_weight.reshape(routes * rank_and_state, d_inner).to(x.dtype))
    dts, Bs, Cs = torch.split(_RouteProjections.apply(proj), [rank, 1, 1], dim=2)
    cfg = choose_scan_config(batch, routes, d_inner, 1, length, x.device, training=training, map_io=True,
                             tuning=tuning, **launch)
    A = -torch.exp(A_logs.float())
    D, delta_bias = Ds.float().contiguous(), dt_projs_bias.reshape(-1).float().contiguous()
    if tuning.fused_dt_proj and not training and cfg.n_chunks == 1:
        y, _ = scan_forward(x, dts, A, Bs, Cs, D, delta_bias, True, torch.float32, cfg, False,
                            dt_proj=dt_projs_weight.reshape(routes * d_inner, rank).float().contiguous())
        return merge_layout(y.view(batch, routes, d_inner, length), height, width, tuning)
    delta = torch.matmul(dt_projs_weight.to(dts.dtype), dts)                  # (B, 4, Di, L)
    # B and C stay views of the routed projections: the N = 1 kernels take their row stride.
    return _TritonCrossScanMerge.apply(x, delta.view(batch, routes * d_inner, length), A, Bs, Cs, D, delta_bias,
                                       cfg, tuning)
