"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

CI proof that each kernel builds for ``GPUTarget("cuda", capability, 32)`` at VMamba-like block
sizes: ``compile_kernels(90)`` (interpreter off).
"""

from __future__ import annotations

from .chunked_scan import (_chunk_carry_kernel, _scan_bwd_chunk_kernel, _scan_bwd_kernel, _scan_chunk_state_kernel,
                           _scan_fwd_kernel)
from .common import INTERPRET, triton
from .cross_scan import _cross_kernel
from .layernorm import _ln_bwd_kernel, _ln_fwd_kernel
from .scan_n1 import _scan_bwd_n1_kernel, _scan_fwd_n1_kernel
from .ss2d import _route_kernel
from .tuning import DEFAULT_TUNING, choose_scan_config

__all__ = ["kernel_variants", "compile_kernels"]

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
        variants.append((f"bwd_chunk[N={d_state}]", _scan_bwd_chunk_kernel, dict(**flags, **blocks), num_warps))
        # The N = 1 forwards also read u from the map in the fused SS2D core.
        for map_io in ((False, True) if d_state == 1 else (False,)):
            tag = ",map" if map_io else ""
            variants.append((f"chunk_state[N={d_state}{tag}]", _scan_chunk_state_kernel,
                             dict(**flags, **blocks, MAP_IO=map_io), num_warps))
            if d_state == 1:
                # The training forward, and the inference forward loading one tile ahead.
                for prefetch in (False, True):
                    blocks_2d = dict(BLOCK_D=block_d, BLOCK_T=block_t, MAP_IO=map_io, PREFETCH=prefetch)
                    label = tag + (",prefetch" if prefetch else "")
                    variants.append((f"scan_fwd[N=1{label}]", _scan_fwd_n1_kernel,
                                     dict(**full, STORE_STATES=True, **blocks_2d, DT_PROJ=False), num_warps))
                if map_io:
                    # The inference forward of the fused core: delta formed in the kernel.
                    variants.append((f"scan_fwd[N=1{tag},prefetch,dt_proj]", _scan_fwd_n1_kernel,
                                     dict(**flags, HAS_D=True, HAS_INIT=False, STORE_STATES=False, BLOCK_D=block_d,
                                          BLOCK_T=block_t, MAP_IO=True, PREFETCH=True, DT_PROJ=True), num_warps))
        if d_state == 1:
            variants.append(("scan_bwd[N=1]", _scan_bwd_n1_kernel,
                             dict(**full, BLOCK_D=block_d, BLOCK_T=block_t), num_warps))
        else:
            variants += [
                (f"scan_fwd[N={d_state}]", _scan_fwd_kernel, dict(**full, STORE_STATES=True, **blocks), num_warps),
                (f"scan_bwd[N={d_state}]", _scan_bwd_kernel, dict(**full, **blocks), num_warps),
            ]
        for reverse in (False, True):
            variants.append((f"chunk_carry[N={d_state},reverse={reverse}]", _chunk_carry_kernel,
                             dict(REVERSE=reverse, BLOCK_R=max(1, min(128, 2048 // block_n)), BLOCK_N=block_n), 4))
    variants += [("ln_fwd", _ln_fwd_kernel, dict(BLOCK_R=32, BLOCK_C=128), 4),
                 ("ln_bwd", _ln_bwd_kernel, dict(BLOCK_R=32, BLOCK_C=128), 4)]
    for to_map in (False, True):
        variants.append((f"route[to_map={to_map}]", _route_kernel, dict(TO_MAP=to_map, BLOCK_C=8, BLOCK_L=256), 4))
    block_c, block_hw, _ = DEFAULT_TUNING.cross_scan_launch
    for merge in (False, True):
        variants.append((f"cross[merge={merge}]", _cross_kernel,
                         dict(MERGE=merge, BLOCK_C=block_c, BLOCK_H=block_hw, BLOCK_W=block_hw), 4))
    return variants


def compile_kernels(capability: int, io_dtypes=("fp32", "bf16"), d_states=(1, 16)) -> dict:
    """Compile every kernel for ``GPUTarget("cuda", capability, 32)``; works on a machine without GPU.

    Must run with the interpreter off (kernels are then JITFunctions). Returns
    ``{"<kernel>[...]/<io dtype>": {"cubin_bytes": int, "shared": int}}``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_kernels needs TRITONINTERPRET unset (the interpreter replaces the kernels)")
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
