"""Where the time of one compiled forward goes on this CPU: vmamba-tiny against a torchvision peer.

Each model is compiled with ``torch.compile`` (inductor, default options), called twice, then one
forward under ``torch.profiler`` (with inductor's per-kernel profiling on) is split into: GEMMs and
convolutions (``aten::addmm``, ``aten::mm``, the convolutions, and the ``aten::copy_`` that writes
each addmm's bias into its output first), VMamba's scan operator (its own time, without the x
projection GEMM it calls), and the rest (the compiler's fused LayerNorm / activation / residual /
layout kernels and the Python wrapper).

    python benchmarks/profile_compiled_cpu.py [--resolution 224] [--batch 8] [--peer convnext_tiny]
"""

from __future__ import annotations

import argparse
import os

import torch

GEMM_EVENTS = ("aten::addmm", "aten::mm", "aten::mkldnn_convolution", "aten::copy_", "mkl::_mkl_linear",
               "mkldnn::_convolution_pointwise", "aten::bmm")
SCAN_EVENTS = ("vmamba::cross_selective_scan",)


def _split(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    from torch.profiler import profile

    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        with profile() as prof:
            compiled(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_EVENTS) / 1e3
    scan = sum(e.self_cpu_time_total for e in events if e.key in SCAN_EVENTS) / 1e3
    return {"model": name, "total_ms": total, "gemm_conv_ms": gemm, "scan_op_ms": scan,
            "rest_ms": total - gemm - scan, "table": events.table(sort_by="self_cpu_time_total", row_limit=12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", default="convnext_tiny")
    parser.add_argument("--tables", action="store_true", help="also print the profiler's top events per model")
    args = parser.parse_args()

    import torch._inductor.config as inductor_config
    import torchvision

    from vmamba_cli.memory import tune_malloc
    from vmamba_cli.model import create_model

    tune_malloc()                      # as the `vmamba` command and bench_e2e_cpu.py do
    torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    rows = [_split("vmamba-tiny", create_model("vmamba-tiny").eval(), x),
            _split(args.peer, getattr(torchvision.models, args.peer)().eval(), x)]
    print(f"one compiled forward, {args.resolution}x{args.resolution} batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"{'model':16s} {'total ms':>9s} {'GEMM+conv':>10s} {'scan op':>8s} {'rest':>8s}")
    for row in rows:
        print(f"{row['model']:16s} {row['total_ms']:9.1f} {row['gemm_conv_ms']:10.1f} {row['scan_op_ms']:8.1f} "
              f"{row['rest_ms']:8.1f}")
    if args.tables:
        for row in rows:
            print(f"\n{row['model']}\n{row['table']}")


if __name__ == "__main__":
    main()
