"""Backend "cpu": the native selective scan and fused SS2D core as differentiable PyTorch ops.

Two entry points, both differentiable with respect to every tensor input:

* ``selective_scan`` - the plain interface of docs/design.md §5.1 on (B, K*D, L) tensors.
* ``cross_selective_scan`` - the whole SS2D core in one kernel: it reads the (B, Di, H, W) map
  along the four scan routes by index arithmetic, forms delta from the x_proj output on the fly
  and sums the four directions into its output, so no (B, 4, Di, L) copy of u, delta or y exists.
  The x_proj projection is a single GEMM on the *unpermuted* map (a per-pixel projection does not
  care about scan order); its gradient is two more GEMMs.

Whatever the kernel cannot take (fake or meta tensors, dispatch modes, no compiler) runs on the
PyTorch path instead; empty inputs return empty outputs without calling the kernel.
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..common import NUM_DIRECTIONS, check_core_shapes, check_scan_shapes, empty_scan, is_empty_core
from ..compose import compose_ops
from ..torch_scan import cross_merge_torch, cross_scan_torch, selective_scan_blocked
from .build import Problem, load_library
from .plan import block_size, chunk_length, fused_tasks

__all__ = ["selective_scan", "cross_selective_scan"]


def _merge_slices(buffer: torch.Tensor) -> torch.Tensor:
    """Sum of the route groups' slices (dim 0), in place in the first."""
    out = buffer[0]
    for index in range(1, buffer.shape[0]):
        out.add_(buffer[index])
    return out


def _run(backward: bool, **fields) -> None:
    problem = Problem()
    for name, value in fields.items():
        if isinstance(value, torch.Tensor) or value is None:
            value = None if value is None else value.data_ptr()
        setattr(problem, name, value)
    problem.num_threads = torch.get_num_threads()
    lib = load_library()
    status = (lib.vmamba_scan_backward if backward else lib.vmamba_scan_forward)(ctypes.byref(problem))
    if status:
        raise RuntimeError({2: "native scan: inconsistent sizes", 3: "native scan: out of memory"}
                           .get(status, f"native scan failed (status {status})"))


def _native_ok(*tensors) -> bool:
    """The kernel reads raw memory: only for plain CPU tensors outside dispatch modes (fake/meta
    tensors, FlopCounterMode, torch.compile tracing), where the PyTorch path runs instead."""
    if load_library() is None or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter))
               for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _save(ctx, inputs: dict, **more) -> None:
    """Keep the kernel's input buffers (and ``more``) for the backward as saved tensors: autograd
    frees them after a backward unless the graph is retained, and a retained graph can be walked
    again."""
    tensors = {**inputs, **more}
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())


def _saved(ctx) -> dict:
    return dict(zip(ctx.saved_names, ctx.saved_tensors))


# --------------------------------------------------------------------------------------------
# Plain selective scan (docs/design.md §5.1 shapes)
# --------------------------------------------------------------------------------------------

def _plain_inputs(u, delta, A, B, C, D, delta_bias):
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    zeros = u.new_zeros(channels, dtype=torch.float32)
    return dict(
        u=_f32(u.transpose(1, 2)), delta=_f32(delta.transpose(1, 2)),
        # B and C side by side per (step, group): the kernel reads them as one row.
        proj=torch.cat([B, C], dim=2).to(torch.float32).permute(0, 3, 1, 2).contiguous(),
        A=_f32(A.view(groups, per_group, d_state).transpose(1, 2)),
        D=zeros if D is None else _f32(D), bias=zeros if delta_bias is None else _f32(delta_bias),
    ), dict(batch=batch, length=length, height=length, width=1, channels=channels, groups=groups,
            group_channels=per_group, d_state=d_state, rank=0,
            block=block_size(per_group, batch * groups), chunk=chunk_length(d_state), fused=0)


def _plain_forward(inputs, sizes, softplus, save_states):
    b, length, ch = sizes["batch"], sizes["length"], sizes["channels"]
    y = torch.empty(b, length, ch, dtype=torch.float32)
    states = None
    if save_states:
        n_chunks = -(-length // sizes["chunk"])
        states = torch.empty(b, sizes["groups"], n_chunks, sizes["d_state"], sizes["group_channels"])
    _run(False, **sizes, **inputs, softplus=int(softplus), y=y, states=states)
    return y, states


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype):
        inputs, sizes = _plain_inputs(u, delta, A, B, C, D, delta_bias)
        y, states = _plain_forward(inputs, sizes, delta_softplus, save_states=True)
        _save(ctx, inputs, states_in=states)
        ctx.sizes, ctx.softplus = sizes, delta_softplus
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, delta_bias)]
        return y.transpose(1, 2).contiguous().to(output_dtype)

    @staticmethod
    @once_differentiable
    @torch.autocast(device_type="cpu", enabled=False)
    def backward(ctx, grad_y):
        buffers, sizes = _saved(ctx), ctx.sizes
        b, length, ch = sizes["batch"], sizes["length"], sizes["channels"]
        groups, per_group, d_state = sizes["groups"], sizes["group_channels"], sizes["d_state"]
        n_blocks = -(-per_group // sizes["block"])
        du = torch.empty(b, length, ch)
        ddelta = torch.empty(b, length, ch)
        red = torch.empty(b, n_blocks, length, groups, 2 * d_state)
        dbias = torch.empty(b, groups, per_group)
        dA = torch.empty(b, groups, d_state, per_group)
        dD = torch.empty(b, groups, per_group)
        _run(True, **sizes, **buffers, softplus=int(ctx.softplus), grad_y=_f32(grad_y.transpose(1, 2)),
             du=du, ddelta=ddelta, red=red, dbias=dbias, dA=dA, dD=dD)
        dBC = red.sum(1).permute(0, 2, 3, 1)  # (b, G, 2N, L)
        t_u, t_delta, t_A, t_B, t_C, t_D, t_bias = ctx.dtypes
        grads = (
            du.transpose(1, 2).contiguous().to(t_u),
            ddelta.transpose(1, 2).contiguous().to(t_delta),
            dA.sum(0).transpose(1, 2).reshape(ch, d_state).to(t_A),
            dBC[:, :, :d_state].contiguous().to(t_B),
            dBC[:, :, d_state:].contiguous().to(t_C),
            None if t_D is None else dD.sum(0).reshape(ch).to(t_D),
            None if t_bias is None else dbias.sum(0).reshape(ch).to(t_bias),
        )
        return (*grads, None, None)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                   output_dtype=torch.float32):
    """Selective scan (docs/design.md §5) in the native kernel; float32 state, float32 output by default."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if u.numel() == 0:
        return empty_scan(u, delta, A, B, C, D, delta_bias, output_dtype)
    if not _native_ok(u, delta, A, B, C, D, delta_bias):
        return selective_scan_blocked(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype)
    if _needs_grad(u, delta, A, B, C, D, delta_bias):
        return _SelectiveScanCPU.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), output_dtype)
    inputs, sizes = _plain_inputs(u, delta, A, B, C, D, delta_bias)
    y, _ = _plain_forward(inputs, sizes, delta_softplus, save_states=False)
    return y.transpose(1, 2).contiguous().to(output_dtype)


# --------------------------------------------------------------------------------------------
# Fused SS2D core
# --------------------------------------------------------------------------------------------

def _derived(param: torch.Tensor, make):
    """``make(param)``, cached on the parameter itself while it is unchanged (inference).

    The stamp (version counter, storage, dtype) changes with every in-place update (optimizer
    steps, load_state_dict), so a stale value is never used; under autograd nothing is cached.
    """
    if param.requires_grad and torch.is_grad_enabled():
        return make(param)
    if param.is_inference():
        # Created under inference_mode: no version counter to notice in-place updates with.
        with torch.no_grad():
            return make(param)
    # Values made under inference_mode are inference tensors, which autograd may not save: the
    # mode is part of the stamp, so leaving it recomputes them once.
    stamp = (param._version, param.data_ptr(), param.dtype, tuple(param.shape), torch.is_inference_mode_enabled())
    cached = getattr(param, "_vmamba_cpu_scan", None)
    if cached is None or cached[0] != stamp:
        with torch.no_grad():
            cached = (stamp, make(param))
        try:
            param._vmamba_cpu_scan = cached
        except (AttributeError, RuntimeError):  # tensors that take no attributes: just recompute
            pass
    return cached[1]


def _kernel_A(A_logs):
    """(A = -exp(A_logs) as (K*D, N), the same as (K, N, D) for the kernel's channel vectors)."""
    A = -torch.exp(A_logs.to(torch.float32))
    return A, A.view(NUM_DIRECTIONS, -1, A.shape[1]).transpose(1, 2).contiguous()


def _fused_forward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, save_states, tasks):
    batch, d, height, width = x.shape
    length = height * width
    rank, d_state = dt_projs_weight.shape[2], A_logs.shape[1]
    width_proj = rank + 2 * d_state
    # Channels-last rows; free when x already is channels_last (the model keeps it so).
    rows = _f32(x.permute(0, 2, 3, 1)).view(batch * length, d)
    w_proj = x_proj_weight.to(torch.float32).reshape(NUM_DIRECTIONS * width_proj, d)
    proj = rows @ w_proj.t()  # (B*L, 4 * (R + 2N)): [dts | B | C] of every direction at each pixel
    A, A_kernel = _derived(A_logs, _kernel_A)
    inputs = dict(
        u=rows, proj=proj, wdt=_derived(dt_projs_weight, lambda w: _f32(w.transpose(1, 2))),
        bias=_f32(dt_projs_bias), A=A_kernel, D=_f32(Ds),
    )
    block, route_groups = tasks or fused_tasks(d, batch)
    sizes = dict(batch=batch, length=length, height=height, width=width, channels=d, groups=NUM_DIRECTIONS,
                 group_channels=d, d_state=d_state, rank=rank, block=block, route_groups=route_groups,
                 chunk=chunk_length(d_state), fused=1)
    y = torch.empty(route_groups, batch, height, width, d, dtype=torch.float32)
    states = None
    if save_states:
        n_chunks = -(-length // sizes["chunk"])
        states = torch.empty(batch, NUM_DIRECTIONS, n_chunks, d_state, d)
    _run(False, **sizes, **inputs, softplus=1, y=y, states=states)
    return _merge_slices(y).permute(0, 3, 1, 2), inputs, sizes, states, w_proj, A


class _CrossSelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, tasks):
        y, inputs, sizes, states, w_proj, A = _fused_forward(
            x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, True, tasks)
        _save(ctx, inputs, states_in=states, w_proj=w_proj, A_dense=A)
        ctx.sizes = sizes
        ctx.dtypes = [t.dtype for t in (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)]
        return y

    @staticmethod
    @once_differentiable
    @torch.autocast(device_type="cpu", enabled=False)
    def backward(ctx, grad_y):
        buffers, sizes = _saved(ctx), ctx.sizes
        w_proj, A = buffers.pop("w_proj"), buffers.pop("A_dense")
        b, length, d = sizes["batch"], sizes["length"], sizes["channels"]
        height, width = sizes["height"], sizes["width"]
        rank, d_state = sizes["rank"], sizes["d_state"]
        k = NUM_DIRECTIONS
        n_blocks = -(-d // sizes["block"])
        du = torch.empty(sizes["route_groups"], b * length, d)
        red = torch.empty(b, n_blocks, length, k * (rank + 2 * d_state))
        dwdt = torch.empty(b, k, rank, d)
        dbias = torch.empty(b, k, d)
        dA = torch.empty(b, k, d_state, d)
        dD = torch.empty(b, k, d)
        _run(True, **sizes, **buffers, softplus=1, grad_y=_f32(grad_y.permute(0, 2, 3, 1)),
             du=du, red=red, dwdt=dwdt, dbias=dbias, dA=dA, dD=dD)
        du = _merge_slices(du)
        d_proj = (red[:, 0] if n_blocks == 1 else red.sum(1)).view(b * length, -1)
        t_x, t_xp, t_dtw, t_dtb, t_alog, t_ds = ctx.dtypes
        need = ctx.needs_input_grad
        dx = d_xproj = None
        if need[0]:
            dx = torch.addmm(du, d_proj, w_proj).view(b, height, width, d).permute(0, 3, 1, 2).to(t_x)
        if need[1]:
            d_xproj = (d_proj.t() @ buffers["u"]).view(k, rank + 2 * d_state, d).to(t_xp)
        d_alogs = dA.sum(0).transpose(1, 2).reshape(k * d, d_state) * A
        return (dx, d_xproj, dwdt.sum(0).transpose(1, 2).to(t_dtw), dbias.sum(0).to(t_dtb),
                d_alogs.to(t_alog), dD.sum(0).reshape(k * d).to(t_ds), None)


def _composed_torch(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    return compose_ops(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                       scan=selective_scan_blocked, cross_scan=cross_scan_torch, cross_merge=cross_merge_torch)


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, tasks=None):
    """Fused SS2D core: (B, Di, H, W) -> (B, Di, H, W) float32 (channels-last strides).

    Same result as the composed ops (cross-scan, x/dt projections, selective scan with softplus,
    cross-merge), forward and backward. ``tasks`` = (channels per task, route groups) replaces the
    work split of ``plan.fused_tasks`` (the route groups must divide four).
    """
    check_core_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if is_empty_core(x) or not _native_ok(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        return _composed_torch(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    # The kernel reads float32 buffers: autocast must not turn the projection matmul into bf16/fp16.
    with torch.autocast(device_type="cpu", enabled=False):
        if _needs_grad(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
            return _CrossSelectiveScanCPU.apply(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, tasks)
        return _fused_forward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, False, tasks)[0]
