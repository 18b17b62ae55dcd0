"""Host (Python + dispatcher) time of vmamba's Triton code path, measured on a machine without a GPU.

    python benchmarks/bench_host_cpu.py [--rounds 5] [--profile]

On CUDA a vmamba-tiny training step can be bound by the host's time to issue its kernels (see
docs/kernels-gpu.md). That time is Python, autograd and dispatcher work, which a CPU runs the same
way: here every Triton kernel launch is replaced by a no-op and the tensors are tiny, so what is
timed is the host work of the channel LayerNorm Function and of the fused SS2D core, forward +
backward, on CPU tensors (the values computed are meaningless). ``--profile`` prints the Python
functions taking the most time in the core. Best of ``--rounds`` rounds of 200 calls each; a plain
``sum().backward()`` is timed alongside as the floor of any autograd call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)   # the real kernel objects, replaced below

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels():
    """Replace every @triton.jit kernel in the Triton backend's modules by a no-op launch (this
    process only measures host time), and return the two ops timed."""
    from vmamba_cli.kernels import triton as triton_backend
    from vmamba_cli.kernels.triton import (autograd, chunked_scan, common, cross_scan, launch, layernorm, scan_n1,
                                           ss2d)

    if common.triton is None:
        return None
    for module in (chunked_scan, scan_n1, launch, autograd, cross_scan, ss2d, layernorm):
        for name in dir(module):
            if type(getattr(module, name)).__name__ == "JITFunction":
                setattr(module, name, _NoLaunch())
    return triton_backend, layernorm


def _best_us(fn, rounds: int, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile of the SS2D core's host work")
    args = parser.parse_args(argv)
    modules = _stub_kernels()
    if modules is None:
        print("bench_host_cpu: triton is not importable; nothing to measure", file=sys.stderr)
        return 0
    triton_backend, layernorm = modules
    torch.manual_seed(0)
    rows = torch.randn(16, 96, requires_grad=True)
    weight, bias = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    x = torch.randn(1, 96, 4, 4, requires_grad=True)
    params = [torch.randn(4, 8, 96, requires_grad=True), torch.randn(4, 96, 6, requires_grad=True),
              torch.randn(4, 96, requires_grad=True), torch.randn(384, 1, requires_grad=True),
              torch.randn(384, requires_grad=True)]

    def layer_norm():
        layernorm.layer_norm_rows(rows, weight, bias).sum().backward()

    def core():
        triton_backend.cross_selective_scan(x, *params).sum().backward()

    def floor():
        rows.sum().backward()

    for name, fn in (("LayerNorm Function fwd+bwd", layer_norm), ("fused SS2D core fwd+bwd", core),
                     ("sum().backward() (floor)", floor)):
        print(f"{name:<30} {_best_us(fn, args.rounds):8.1f} us host per call", flush=True)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(500):
            core()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
